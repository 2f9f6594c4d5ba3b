package infer

// Sink is where a call delivers its events when its opener supplies the
// channel, so that the events of a request that moves between backends
// reach its consumer through one channel with no goroutine copying them.
//
// The call follows Call's rules on Events (a bound on the events left
// unread, which is the backend's and not the channel's capacity, a
// terminal event, then close) with one exception:
// when Divert is set and the call's first event is an error, Divert is
// offered it first. If Divert takes it (returns true) the call ends there
// without delivering it and without closing Events, which the opener
// hands to the request's next call. Divert is called on the backend's
// delivering goroutine and must not block or call back into the call.
type Sink struct {
	// Events receives the events. When nil, the opening backend makes it,
	// sized as it sizes its own calls' channels, and stores it here.
	Events chan Event
	// Divert, if set, may take a first event that is an error.
	Divert func(*Error) bool
}
