// Package scheduler admits inference requests, holds them in a bounded queue
// while every worker slot is busy, and dispatches each one to the least loaded
// ready worker. It owns slot accounting per worker and the request ids that
// name a sequence on a worker's ring.
//
// It knows nothing about HTTP or QUIC, and reaches workers only through the
// small Worker interface that cmd/h3infer satisfies with backend handles.
package scheduler
