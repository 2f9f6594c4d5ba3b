//go:build linux

package transport

import (
	"sync"
	"time"
)

// The heartbeat is a counter in the segment's header that the worker's
// generation loop counts up once per pass (WorkerEnd.Beat). A process that
// is alive but stuck (a deadlock, a runaway kernel in a native library)
// still answers signals and holds its ring open, so process exit alone
// would never catch it; a counter that stops moving does. It costs the
// worker one atomic add per loop pass and no syscall, and the gateway reads
// it on its own schedule, so it adds nothing to the token path.

// Beat tells the gateway the worker's loop is making progress. Call it once
// per pass of the loop that serves requests, including idle passes; a loop
// that blocks must wake at least every few seconds to call it.
func (w *WorkerEnd) Beat() { w.seg.beat() }

// HeartbeatWatch tells how long a worker's heartbeat has stood still. The
// zero value is not usable; use GatewayEnd.HeartbeatWatch.
type HeartbeatWatch struct {
	seg *Segment

	mu      sync.Mutex
	last    uint64
	changed time.Time
	started bool
}

// HeartbeatWatch returns a watch over this endpoint's worker heartbeat.
func (g *GatewayEnd) HeartbeatWatch() *HeartbeatWatch {
	return &HeartbeatWatch{seg: g.seg}
}

// Stalled reads the heartbeat and reports how long it has not moved as of
// now. The first reading counts as movement, so a watch starts from zero.
// It reports 0 once the segment is closed: a closed ring is the exit path's
// business, not a hang.
func (h *HeartbeatWatch) Stalled(now time.Time) time.Duration {
	n, ok := h.seg.beats()
	h.mu.Lock()
	defer h.mu.Unlock()
	if !ok {
		return 0
	}
	if !h.started || n != h.last {
		h.started, h.last, h.changed = true, n, now
		return 0
	}
	return now.Sub(h.changed)
}
