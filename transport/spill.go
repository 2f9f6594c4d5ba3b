//go:build linux

package transport

import "h3infer/infer"

// callChannel is the capacity of the channel a call makes for its events.
// A consumer that keeps up holds one or two events at a time; the rest of
// CallBuffer is allocated only by a call whose consumer falls further
// behind, in its spill queue. A channel is allocated whole when the call
// opens, on every request's path to its first token, at 120 bytes an
// event: 256 events took 32 KiB of every running stream, 16 take 2 KiB
// (docs/BENCHMARKS.md, "Scenario 3: running streams").
const callChannel = 16

// channelSize is the capacity of the channels the end makes: callChannel,
// or one more than CallBuffer when that is smaller, which then never
// spills.
func (g *GatewayEnd) channelSize() int { return min(callChannel, g.callBuffer+1) }

// spill holds the events of a call that its channel had no room for, in
// order, and the goroutine that moves them into the channel as the
// consumer takes events out. The receive loop never waits on a consumer,
// so some goroutine must hold what a lagging consumer has not taken; it
// exists only while the queue is not empty, so a call whose consumer
// keeps within callChannel events has none. Every field is guarded by
// the call's mu.
type spill struct {
	queue    []infer.Event // queue[head:] wait, oldest first
	head     int
	draining bool          // a drain goroutine runs; it alone sends on events
	stop     chan struct{} // closed by dropSpill; made with the goroutine
	dropped  bool          // Cancel dropped the queue
}

// unread is how many events the call holds that its consumer has not
// taken. The one a drain goroutine is sending counts until it has taken
// the lock again, so for that moment it counts twice and a call may
// overflow one event early.
func (c *Call) unread() int {
	return len(c.events) + len(c.spill.queue) - c.spill.head
}

// put hands ev to the consumer: into the channel when it has room and no
// earlier event waits in the queue, else into the queue, starting the
// goroutine that drains it. The caller holds c.mu and has checked the
// bound; nothing sends on events but put and that goroutine, so a send
// here never blocks.
func (c *Call) put(ev infer.Event) {
	s := &c.spill
	if !s.draining && len(c.events) < cap(c.events) {
		c.events <- ev
		return
	}
	if len(s.queue) == cap(s.queue) && s.head > 0 {
		// Reuse the room of the events already sent rather than
		// growing: the queue never holds more than the bound.
		n := copy(s.queue, s.queue[s.head:])
		clear(s.queue[n:])
		s.queue, s.head = s.queue[:n], 0
	}
	s.queue = append(s.queue, ev)
	if !s.draining {
		s.draining = true
		s.stop = make(chan struct{})
		go c.drain(s.stop)
	}
}

// finish closes the events after the terminal event has been put or the
// call was cancelled: at once, or once the drain goroutine has sent the
// queue. The caller holds c.mu and has set ended.
func (c *Call) finish() {
	if !c.spill.draining {
		c.closeEvents()
	}
}

// closeEvents closes the channel unless it is closed. c.mu is held.
func (c *Call) closeEvents() {
	if !c.closed {
		c.closed = true
		close(c.events)
	}
}

// dropSpill stops the drain goroutine, if one runs, and has it drop the
// queue and close the channel. c.mu is held.
func (c *Call) dropSpill() {
	s := &c.spill
	if s.draining && !s.dropped {
		s.dropped = true
		close(s.stop)
	}
}

// drain sends the spill queue into the channel in order, waiting for the
// consumer to make room, until the queue is empty or Cancel drops it. It
// closes the channel when the call ended meanwhile, which put's callers
// leave to it while it runs.
func (c *Call) drain(stop <-chan struct{}) {
	s := &c.spill
	c.mu.Lock()
	for !s.dropped && s.head < len(s.queue) {
		ev := s.queue[s.head]
		c.mu.Unlock()
		select {
		case c.events <- ev:
			c.mu.Lock()
			// The event sent is still at head: put compacts the queue
			// only from head on.
			s.queue[s.head] = infer.Event{}
			s.head++
		case <-stop:
			c.mu.Lock()
		}
	}
	// The queue's memory goes back with it; a consumer that falls behind
	// again starts a new one.
	s.queue, s.head, s.draining, s.stop = nil, 0, false, nil
	if c.ended {
		c.closeEvents()
	}
	c.mu.Unlock()
}
