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
// keeps within callChannel events has none. While it runs, every event
// passes through it, which costs a worker flooding one call several
// times what the channel alone did (docs/BENCHMARKS.md, "Scenario 3:
// running streams"); a stream's tokens come a decode step apart. Every
// field is guarded by the call's mu.
type spill struct {
	// ring holds the waiting events, oldest first, from head on and
	// wrapping around; its length is 0 or a power of two, doubled when
	// full, so it never holds more than twice what waited at once.
	ring     []infer.Event
	head, n  int
	draining bool          // a drain goroutine runs; it alone sends on events
	stop     chan struct{} // closed by dropSpill; made with the goroutine
	dropped  bool          // Cancel dropped the queue
}

// unread is how many events the call holds that its consumer has not
// taken. The one a drain goroutine is sending counts until it has taken
// the lock again, so for that moment it counts twice and a call may
// overflow one event early.
func (c *Call) unread() int {
	return len(c.events) + c.spill.n
}

// push adds ev behind the waiting events.
func (s *spill) push(ev infer.Event) {
	if s.n == len(s.ring) {
		grown := make([]infer.Event, max(8, 2*len(s.ring)))
		k := copy(grown, s.ring[s.head:])
		copy(grown[k:], s.ring[:s.head])
		s.ring, s.head = grown, 0
	}
	s.ring[(s.head+s.n)&(len(s.ring)-1)] = ev
	s.n++
}

// pop removes the oldest waiting event, which the caller has sent.
func (s *spill) pop() {
	s.ring[s.head] = infer.Event{} // let go of its text and slices
	s.head = (s.head + 1) & (len(s.ring) - 1)
	s.n--
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
	s.push(ev)
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
//
// Whatever fits goes in under one hold of the lock, so that the receive
// loop, which takes the same lock for every event it delivers, meets it
// once per batch rather than once per event; only the wait for room is
// outside the lock.
func (c *Call) drain(stop <-chan struct{}) {
	s := &c.spill
	c.mu.Lock()
	for !s.dropped && s.n > 0 {
		if len(c.events) < cap(c.events) {
			// Nothing else sends on events while draining, so this
			// does not block.
			c.events <- s.ring[s.head]
			s.pop()
			continue
		}
		ev := s.ring[s.head]
		c.mu.Unlock()
		select {
		case c.events <- ev:
			c.mu.Lock()
			// The event sent is still the oldest: put only adds
			// behind it, and a grown ring keeps the order.
			s.pop()
		case <-stop:
			c.mu.Lock()
		}
	}
	// The queue's memory goes back with it; a consumer that falls behind
	// again starts a new one.
	s.ring, s.head, s.n, s.draining, s.stop = nil, 0, 0, false, nil
	if c.ended {
		c.closeEvents()
	}
	c.mu.Unlock()
}
