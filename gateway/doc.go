// Package gateway serves the OpenAI-compatible API over HTTP/3 (quic-go) and a TCP
// HTTP/1.1+HTTP/2 fallback that advertises h3 through Alt-Svc, writes token
// streams as server-sent events, runs the admin listener (health, readiness,
// metrics), and maps every error to an HTTP status in one place.
//
// It must not import the worker pool or the worker's packages; it reaches
// workers only through the scheduler.
package gateway
