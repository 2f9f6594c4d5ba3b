// Package loadgen drives an OpenAI-compatible completion endpoint with
// streamed chat requests over HTTP/3, HTTP/2 or HTTP/1.1 and measures what
// a user of it feels: time to first token, the gaps between tokens, the
// whole answer's latency, throughput and errors. It is the engine of
// `h3infer bench`; it imports nothing of h3infer's server side, so it
// measures the gateway from the outside as any client would.
package loadgen
