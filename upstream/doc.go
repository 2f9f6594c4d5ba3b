// Package upstream is the backend kind that forwards requests to remote
// OpenAI-compatible servers: vLLM, SGLang, llama.cpp's server, or another
// h3infer tier. Each configured upstream is a Handle the scheduler
// dispatches to like a worker process; the Set owns them, discovers and
// probes their models, ejects an upstream after consecutive failures and
// brings it back on a successful probe, and swaps handles on Update.
//
// A request goes upstream as a streaming chat or completion request over
// HTTP/2 (or HTTP/1.1) or HTTP/3, with the gateway's own credential for
// that upstream, never the client's; its SSE answer comes back as
// infer.Events, and every failure ends the call with an explicit error
// event carrying one of infer's codes, marked Unstarted while no token
// has gone out so that the scheduler may move the request elsewhere.
//
// It imports nothing of h3infer but the vocabulary (infer, priority,
// config) and the scheduler's Backend type; cmd/h3infer wires it in.
package upstream
