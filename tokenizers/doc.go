// Package tokenizers keeps, in the gateway process, the tokenizers and
// chat templates of the model versions the workers serve, so that
// /tokenize and /detokenize count and decode exactly as a worker does for
// the same version: each is read from its version's directory (the same
// model.json and tokenizer.json the worker reads) on first use, shared by
// concurrent requests, and bounded in number.
//
// Every call into package tokenize is in model.go. It must not import the
// gateway, the worker process's packages (engine, ort) or workerpool:
// cmd/h3infer resolves a request to a version directory and wires it in.
package tokenizers
