// Package scheduler admits inference requests, orders the waiting ones by
// urgency (with aging so nothing starves), shares each urgency between
// tenants by weight, fails requests whose deadline passes while queued,
// bounds the queue per tenant and overall, and dispatches each request to
// the least loaded ready worker with a free slot. It owns slot accounting
// per worker and the request ids that name a sequence on a worker's ring.
//
// It knows nothing about HTTP or QUIC, and reaches workers only through the
// small Worker interface that cmd/h3infer satisfies with the worker pool's
// process handles.
package scheduler
