// Package engine is the worker process's generation loop: it takes
// requests from the shared-memory ring, admits them within the worker's
// slots and KV-cache budget, most urgent first, prefills each prompt
// alone and advances every running sequence of a model by one token per
// decode step (continuous batching), samples, detokenizes and sends the
// tokens back. Work of requests that are not urgent can run on a bulk
// lane at a lower OS priority, beside urgent work on the loop's thread.
//
// It drives models through its Model interface, which package ort
// implements with ONNX Runtime and the built-in synthetic model
// implements at no cost, so benchmarks run the loop production runs.
// Loading a model directory is injected (Config.Load): this package
// imports neither ort nor anything of the gateway, and reads no flags or
// environment; cmd/h3infer wires it.
package engine
