// Package backend runs language models: in the worker process it owns the
// ONNX Runtime sessions, model loading, the tokenizer and detokenizer,
// sampling and the generation loop that answers frames from the
// shared-memory ring; in the gateway process its Pool starts, watches and
// restarts the worker processes.
//
// It must not import gateway: the gateway consumes backend, never the
// other way round. Flags and environment are read only by cmd/h3infer.
package backend
