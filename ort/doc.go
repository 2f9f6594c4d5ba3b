// Package ort runs language models with ONNX Runtime, in the worker
// process: it loads a model directory (model.json, tokenizer.json,
// model.onnx) into a session on the CPU, CUDA or TensorRT provider,
// prefills prompts, keeps the KV cache of a batch of sequences (in Go
// memory, or on the device through IO binding) and runs its decode steps,
// widening half-precision logits for sampling.
//
// A Model is what the generation loop of package engine drives (its Model
// interface; cmd/h3infer checks the fit where it wires the two), yet this
// package imports neither engine nor anything of the gateway: sampling,
// batching policy and the ring are engine's. It is the only package that
// links ONNX Runtime (cgo), and only cmd/h3infer imports it; the tests of
// engine and workerpool do too, to drive real models.
package ort
