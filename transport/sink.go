//go:build linux

package transport

import (
	"fmt"

	"h3infer/infer"
	"h3infer/priority"
)

// OpenSink is Open with the call's events delivered into sink's channel
// when sink is not nil (making it, as Open makes its own, when sink.Events
// is nil) and its first
// event, when that is an error, offered to sink.Divert first; see
// infer.Sink. The scheduler opens calls this way so that a request's
// events reach its consumer with no goroutine between them, and a request
// whose worker died before it started moves to another worker under the
// same channel.
func (g *GatewayEnd) OpenSink(id uint64, s *infer.Request, sink *infer.Sink) (*Call, error) {
	typ, encode := requestFrame(s)
	return g.openSink(id, typ, s.Class != priority.Bulk, encode, sink)
}

// newCall makes the call for id, on its own channel or on sink's.
func (g *GatewayEnd) newCall(id uint64, handOff bool, sink *infer.Sink) (*Call, error) {
	c := &Call{id: id, g: g, handOff: handOff, limit: g.callBuffer}
	if sink == nil {
		c.events = make(chan infer.Event, g.channelSize())
		return c, nil
	}
	if sink.Events == nil {
		sink.Events = make(chan infer.Event, g.channelSize())
	}
	// An unbuffered channel would have every event of the call pass
	// through the spill goroutine.
	if cap(sink.Events) < 1 {
		return nil, fmt.Errorf("transport: open request %d: sink channel holds no events, want at least 1", id)
	}
	c.events, c.divert = sink.Events, sink.Divert
	return c, nil
}

// diverted offers e, the call's terminal error, to its sink's Divert when
// it is the call's first event, and reports whether Divert took it; the
// caller then neither delivers it nor closes the channel. c.mu is held.
func (c *Call) diverted(e *infer.Error) bool {
	return e != nil && !c.started && c.divert != nil && c.divert(e)
}
