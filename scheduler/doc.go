// Package scheduler admits inference requests, orders the waiting ones by
// urgency (with aging so nothing starves), shares each urgency between
// tenants by weight, fails requests whose deadline passes while queued,
// bounds the queue per tenant and overall, and dispatches each request to
// the least loaded ready worker with a free slot. It owns slot accounting
// per worker and the request ids that name a sequence on a worker's ring.
//
// It knows nothing about HTTP or QUIC, nor how a backend runs a request:
// it reaches backends only through the small Backend interface, and speaks
// infer's vocabulary with them.
package scheduler
