// Package ratelimit keeps token buckets: in process, or in Redis with a
// GCRA script so that several gateway instances share one limit. Units
// taken can be given back (a reservation that was not all used). It knows
// nothing about HTTP, tenants or what a unit costs; the gateway decides
// that.
package ratelimit
