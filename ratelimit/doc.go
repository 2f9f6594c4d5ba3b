// Package ratelimit keeps token buckets: in process with golang.org/x/time/rate,
// or in Redis with a GCRA script so that several gateway instances share one
// limit. It knows nothing about HTTP, tenants or what a unit costs; the
// gateway decides that.
package ratelimit
