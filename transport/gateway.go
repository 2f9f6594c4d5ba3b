//go:build linux

package transport

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"

	"h3infer/infer"
)

// ErrProtocol reports a worker that sent frames a sound worker never
// sends: a frame for a request that is not open and was not just
// abandoned, or a frame only the gateway sends. Like ErrCorrupt, the
// worker cannot be trusted after it.
var ErrProtocol = errors.New("transport: worker broke the protocol")

// maxAbandoned bounds the ids of calls the gateway ended before their
// worker did (cancelled, overflowed, malformed) that it still accepts
// frames for. The worker may have written a few frames for such a call
// before it read the cancel, and it sends nothing for it afterwards, so the
// oldest ids are dropped to make room: a frame for a call that many calls
// ago is not a late frame any more.
const maxAbandoned = 4096

// DefaultCallBuffer is the number of events a call buffers when
// GatewayEndConfig.CallBuffer is 0. It is a bound, not an allocation: a
// call's channel holds callChannel events and only a consumer that falls
// further behind has the rest queued (spill.go), the room a consumer needs
// only while its response stream cannot take tokens (the client's
// flow-control window is full, or a rate limit paces it); so it is sized
// for those pauses, not for a whole answer (docs/BENCHMARKS.md, "Where the
// time to first token went").
const DefaultCallBuffer = 256

// GatewayEndConfig configures a GatewayEnd. The zero value is usable.
type GatewayEndConfig struct {
	// CallBuffer is how many unread events a call may hold before it is
	// cancelled as overflowed; 0 means DefaultCallBuffer. Only what a
	// call holds is allocated.
	CallBuffer int
	// OnReady and OnStats are called from the receive loop, so they must
	// return quickly and must not call back into the GatewayEnd's Run.
	OnReady func(Ready)
	OnStats func(Stats)
	// Log receives protocol anomalies; nil discards them.
	Log *slog.Logger
}

// GatewayEnd is the gateway's side of a Segment. It multiplexes many
// concurrent requests over the one pair of rings: Open sends a submit and
// returns a Call, and Run, the single receive loop, routes every token, done
// and error frame to its Call.
//
// Run never blocks on a slow consumer: each Call holds a bounded number of
// unread events and a call that overflows the bound is cancelled. Cancels the receive loop itself must
// send go through a queue drained by a goroutine Run owns, so the loop never
// waits on a full request ring while the worker waits on a full response
// ring.
type GatewayEnd struct {
	seg        *Segment
	callBuffer int
	onReady    func(Ready)
	onStats    func(Stats)
	log        *slog.Logger

	sendMu  sync.Mutex // the request ring has one producer at a time
	sendBuf []byte

	callsMu sync.Mutex
	calls   map[uint64]*Call
	ended   bool // Run has ended every call; Open refuses
	// abandoned holds the ids of calls ended here before the worker ended
	// them, each with its place in abandonedOrder, the ring of the last
	// maxAbandoned such ids; late frames for them are dropped, frames for
	// any other id that is not open are a protocol error.
	abandoned      map[uint64]uint64
	abandonedOrder []uint64
	abandonedSeq   uint64

	cancelMu   sync.Mutex
	cancels    []uint64
	cancelKick chan struct{} // capacity 1: "cancels is not empty"

	running   atomic.Bool
	closeOnce sync.Once
	done      chan struct{} // closed by Close
}

// NewGatewayEnd makes the gateway's endpoint on seg. The caller runs Run in a
// goroutine of its own, and closes seg only after Run has returned.
func NewGatewayEnd(seg *Segment, cfg GatewayEndConfig) *GatewayEnd {
	g := &GatewayEnd{
		seg:        seg,
		callBuffer: cfg.CallBuffer,
		onReady:    cfg.OnReady,
		onStats:    cfg.OnStats,
		log:        cfg.Log,
		calls:      make(map[uint64]*Call),
		abandoned:  make(map[uint64]uint64),
		cancelKick: make(chan struct{}, 1),
		done:       make(chan struct{}),
	}
	if g.callBuffer <= 0 {
		g.callBuffer = DefaultCallBuffer
	}
	if g.log == nil {
		g.log = slog.New(slog.DiscardHandler)
	}
	return g
}

// Call is one request in flight on a GatewayEnd.
type Call struct {
	id uint64
	g  *GatewayEnd

	// mu orders delivery against Cancel: once ended is set, nothing more is
	// delivered, and the channel is closed exactly once (closeEvents).
	mu     sync.Mutex
	ended  bool
	events chan infer.Event
	closed bool // events is closed
	// handOff says the reader yields its thread after the call's first
	// token (see deliver); it is cleared once that token is delivered.
	handOff bool
	// limit is how many unread token events events may hold (CallBuffer,
	// or less for a sink's smaller channel); divert and started serve a
	// call opened into an infer.Sink (sink.go).
	limit   int
	divert  func(*infer.Error) bool
	started bool // an event has been delivered
	spill   spill
}

// ID returns the request id the call was opened with.
func (c *Call) ID() uint64 { return c.id }

// Events returns the call's events. The channel is closed right after the
// terminal event (Done or Err), or by Cancel: at once, or, while events
// the channel had no room for are queued (spill.go), as soon as the
// goroutine holding them has let go of them. A consumer that stops
// reading before the channel is closed must Cancel the call, as the
// scheduler's Dispatch.Close does, or that goroutine waits for it.
func (c *Call) Events() <-chan infer.Event { return c.events }

// Cancel ends the call if it has not ended: no further events are queued,
// the events channel is closed and the worker is told to stop. Events still
// queued for the channel are dropped, also those of a call that had ended;
// while they were being moved into it, one more may arrive after Cancel
// returns, and the channel closes when the goroutine moving them has
// stopped. It never blocks and is safe to call more than once and from any
// goroutine.
func (c *Call) Cancel() {
	c.mu.Lock()
	c.dropSpill()
	if c.ended {
		c.mu.Unlock()
		return
	}
	c.ended = true
	c.finish()
	c.mu.Unlock()
	c.g.abandon(c.id)
	c.g.queueCancel(c.id)
}

// Open registers a call under id and sends its submit. id must not be in use
// by another open call. Open blocks while the request ring is full, and is
// safe for concurrent use.
//
// The first token of a request that is not bulk is handed on at once:
// delivering an event readies the call's consumer on the receive loop's
// own processor, where it would wait until the loop has taken every frame
// queued in the ring behind it (the tokens of running requests) or another
// thread stole it, so the loop yields right after that token and the
// consumer carries it on to the client. A bulk request never makes it
// yield: a loop that yielded after every bulk stream's first token queued
// behind the bulk goroutines it had readied, and urgent tokens waited
// behind them (docs/BENCHMARKS.md, "Urgency").
func (g *GatewayEnd) Open(id uint64, s *infer.Request) (*Call, error) {
	return g.OpenSink(id, s, nil)
}

// requestFrame is the frame that asks a worker for s: an embedding
// request's own, or a completion's submit.
func requestFrame(s *infer.Request) (FrameType, func([]byte) []byte) {
	if s.Embed != nil {
		return FrameEmbed, func(b []byte) []byte { return AppendEmbed(b, s) }
	}
	return FrameSubmit, func(b []byte) []byte { return AppendSubmit(b, s) }
}

// Control sends a control request under id, which must not be in use; the
// call ends with Done (FinishOK) or Error once the worker has acted on it.
// Control requests share the id space of Open's calls.
func (g *GatewayEnd) Control(id uint64, c *Control) (*Call, error) {
	return g.open(id, FrameControl, false, func(b []byte) []byte { return AppendControl(b, c) })
}

func (g *GatewayEnd) open(id uint64, typ FrameType, handOff bool, encode func([]byte) []byte) (*Call, error) {
	return g.openSink(id, typ, handOff, encode, nil)
}

// openSink is open delivering into sink when it is not nil.
func (g *GatewayEnd) openSink(id uint64, typ FrameType, handOff bool, encode func([]byte) []byte, sink *infer.Sink) (*Call, error) {
	c, err := g.newCall(id, handOff, sink)
	if err != nil {
		return nil, err
	}
	g.callsMu.Lock()
	switch {
	case g.ended:
		g.callsMu.Unlock()
		return nil, fmt.Errorf("transport: open request %d: %w", id, ErrClosed)
	case g.calls[id] != nil:
		g.callsMu.Unlock()
		return nil, fmt.Errorf("transport: open request %d: id already in use", id)
	}
	// Registered before the submit goes out, so a fast worker's first token
	// finds the call. Late frames of an abandoned call under the same id
	// now go to this one, as they did before ids were checked.
	g.calls[id] = c
	delete(g.abandoned, id)
	g.callsMu.Unlock()

	g.sendMu.Lock()
	g.sendBuf = encode(g.sendBuf[:0])
	err = g.seg.send(requestRing, typ, id, g.sendBuf)
	g.sendMu.Unlock()
	if err != nil {
		c.mu.Lock()
		endedBefore := c.ended
		if !endedBefore {
			c.ended = true
			if sink != nil {
				// A sink's channel stays its opener's, who may open
				// the next call into it: nothing here closes it.
				c.closed = true
			}
			// Late frames of an abandoned call under this id may be
			// queued behind a full channel: their drain goroutine is
			// stopped, and it closes the channel if it is ours.
			c.dropSpill()
			c.finish()
		}
		c.mu.Unlock()
		g.forget(id)
		if endedBefore {
			// The ring shut between registering the call and the send,
			// and Run ended the call: its terminal error went to its
			// channel, or to the sink's Divert, which acts on it. Either
			// way the call's events say what happened; an error here
			// would have its opener act on the same loss a second time.
			return c, nil
		}
		return nil, fmt.Errorf("transport: open request %d: %w", id, err)
	}
	return c, nil
}

// Close marks the segment closed for both processes and wakes every waiter,
// so Run drains what is left, ends every open call and returns ErrClosed.
// Call it when the worker process has exited, too. It is idempotent and does
// not wait for Run.
func (g *GatewayEnd) Close() {
	g.closeOnce.Do(func() {
		close(g.done)
		g.seg.shut()
	})
}

// Closed reports whether Close has been called, by the owner or by Run as
// it ends. Run closes the endpoint before it fails the open calls, so
// whoever sees a call fail with CodeWorkerLost also sees Closed.
func (g *GatewayEnd) Closed() bool {
	select {
	case <-g.done:
		return true
	default:
		return false
	}
}

// Run is the receive loop. It holds its OS thread for its whole life (its
// futex sleeps block the thread), takes every frame off the response ring as
// soon as it is published, and hands it to its call without blocking. It
// returns after Close, or after the worker closed its end, having ended every
// open call with a CodeWorkerLost error; the error wraps ErrClosed, or
// ErrCorrupt if the worker broke the ring, or ErrProtocol if it sent a
// frame no sound worker sends. Run may be called once.
func (g *GatewayEnd) Run() error {
	if !g.running.CompareAndSwap(false, true) {
		return errors.New("transport: GatewayEnd.Run called twice")
	}
	// The loop does not hold its thread between sleeps (the ring's sleep
	// does, while it lasts). A goroutine locked to its thread hands its
	// processor to another thread whenever it blocks or yields, so the
	// consumer it had just readied with a token would run only once the
	// kernel had woken that thread; unlocked, it runs on this thread as
	// the loop yields.
	var wg sync.WaitGroup
	wg.Go(g.sendCancels)

	buf := make([]byte, 0, 4096)
	var err error
	for {
		var f Frame
		f, err = g.seg.recv(responseRing, buf)
		if err != nil {
			break
		}
		buf = f.Payload[:0]
		if err = g.dispatch(f); err != nil {
			break
		}
	}
	reason := "worker exited"
	if !errors.Is(err, ErrClosed) {
		reason = "worker transport failed"
		err = fmt.Errorf("transport: receive: %w", err)
	}
	g.Close()
	wg.Wait()
	g.endAll(reason)
	return err
}

// dispatch hands f to its call. It returns an error wrapping ErrProtocol
// for a frame no sound worker sends, which ends Run.
func (g *GatewayEnd) dispatch(f Frame) error {
	switch f.Type {
	case FrameToken:
		c, err := g.target(f)
		if c == nil {
			return err
		}
		t, err := DecodeToken(f.Payload)
		if err != nil {
			g.malformed(c, f, err)
			return nil
		}
		c.deliver(infer.Event{Token: t})
	case FrameDone:
		c, err := g.target(f)
		if c == nil {
			return err
		}
		d, err := DecodeDone(f.Payload)
		if err != nil {
			g.malformed(c, f, err)
			return nil
		}
		c.deliver(infer.Event{Done: &d})
	case FrameError:
		c, err := g.target(f)
		if c == nil {
			return err
		}
		e, err := DecodeError(f.Payload)
		if err != nil {
			g.malformed(c, f, err)
			return nil
		}
		c.deliver(infer.Event{Err: &e})
	case FrameEmbedding:
		c, err := g.target(f)
		if c == nil {
			return err
		}
		e, err := DecodeEmbedding(f.Payload)
		if err != nil {
			g.malformed(c, f, err)
			return nil
		}
		c.deliver(infer.Event{Embedding: &e})
	case FrameReady:
		r, err := DecodeReady(f.Payload)
		if err != nil {
			g.log.Warn("dropped malformed frame from worker", "frame", f.Type.String(), "err", err)
			return nil
		}
		if g.onReady != nil {
			g.onReady(r)
		}
	case FrameStats:
		s, err := DecodeStats(f.Payload)
		if err != nil {
			g.log.Warn("dropped malformed frame from worker", "frame", f.Type.String(), "err", err)
			return nil
		}
		if g.onStats != nil {
			g.onStats(s)
		}
	case FrameHeartbeat:
		// Its arrival is the whole message; liveness is the supervisor's
		// business, which watches the process itself.
	default:
		// Submit, cancel and control go the other way.
		return fmt.Errorf("%w: %s frame for request %d", ErrProtocol, f.Type, f.ID)
	}
	return nil
}

// target finds the open call a request frame is for. A late frame for an
// abandoned call yields neither a call nor an error; a frame for an id
// that is neither yields an error wrapping ErrProtocol.
func (g *GatewayEnd) target(f Frame) (*Call, error) {
	g.callsMu.Lock()
	defer g.callsMu.Unlock()
	if c := g.calls[f.ID]; c != nil {
		return c, nil
	}
	if _, ok := g.abandoned[f.ID]; ok {
		if f.Type != FrameToken && f.Type != FrameEmbedding {
			// The worker ended it too: nothing more can come for it.
			delete(g.abandoned, f.ID)
		}
		return nil, nil
	}
	return nil, fmt.Errorf("%w: %s frame for request %d, which is not open", ErrProtocol, f.Type, f.ID)
}

// malformed fails a call whose frame did not decode and tells the worker to
// stop it: the stream can no longer be trusted to be complete.
func (g *GatewayEnd) malformed(c *Call, f Frame, err error) {
	g.log.Warn("malformed frame from worker", "frame", f.Type.String(), "request_id", f.ID, "err", err)
	if c.end(&infer.Error{Code: infer.CodeInternal, Message: "malformed " + f.Type.String() + " frame from worker"}) {
		g.abandon(c.id)
		g.queueCancel(c.id)
	}
}

// deliver hands ev to the call without blocking. A terminal event always
// fits: token events may leave only CallBuffer of them unread, and the
// terminal one comes after.
func (c *Call) deliver(ev infer.Event) {
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return
	}
	if ev.Done != nil || ev.Err != nil {
		c.ended = true
		if !c.diverted(ev.Err) {
			c.put(ev)
			c.finish()
		}
		c.mu.Unlock()
		c.g.forget(c.id)
		return
	}
	if c.unread() >= c.limit {
		c.ended = true
		c.put(infer.Event{Err: &infer.Error{
			Code:    infer.CodeOverflow,
			Message: fmt.Sprintf("request %d: consumer fell %d events behind", c.id, c.limit),
		}})
		c.finish()
		c.mu.Unlock()
		c.g.abandon(c.id)
		c.g.queueCancel(c.id)
		return
	}
	c.put(ev)
	c.started = true
	yield := c.handOff
	c.handOff = false
	c.mu.Unlock()
	if yield {
		runtime.Gosched() // see Open
	}
}

// end delivers a terminal error unless the call has ended, and reports
// whether it did.
func (c *Call) end(e *infer.Error) bool {
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return false
	}
	c.ended = true
	if !c.diverted(e) {
		c.put(infer.Event{Err: e})
		c.finish()
	}
	c.mu.Unlock()
	c.g.forget(c.id)
	return true
}

func (g *GatewayEnd) forget(id uint64) {
	g.callsMu.Lock()
	delete(g.calls, id)
	g.callsMu.Unlock()
}

// abandon forgets call id, which ended here before its worker ended it,
// and keeps accepting the frames the worker may still send for it. Both
// happen under one lock, so the receive loop never sees the id as neither
// open nor abandoned.
func (g *GatewayEnd) abandon(id uint64) {
	g.callsMu.Lock()
	defer g.callsMu.Unlock()
	delete(g.calls, id)
	if g.abandonedOrder == nil {
		g.abandonedOrder = make([]uint64, maxAbandoned)
	}
	slot := g.abandonedSeq % maxAbandoned
	if old := g.abandonedOrder[slot]; g.abandonedSeq >= maxAbandoned && g.abandoned[old] == g.abandonedSeq-maxAbandoned {
		delete(g.abandoned, old)
	}
	g.abandonedOrder[slot] = id
	g.abandoned[id] = g.abandonedSeq
	g.abandonedSeq++
}

// endAll fails every open call and stops Open from adding more.
func (g *GatewayEnd) endAll(reason string) {
	g.callsMu.Lock()
	g.ended = true
	open := make([]*Call, 0, len(g.calls))
	for _, c := range g.calls {
		open = append(open, c)
	}
	g.callsMu.Unlock()
	for _, c := range open {
		c.end(&infer.Error{Code: infer.CodeWorkerLost, Message: reason})
	}
}

func (g *GatewayEnd) queueCancel(id uint64) {
	g.cancelMu.Lock()
	g.cancels = append(g.cancels, id)
	g.cancelMu.Unlock()
	select {
	case g.cancelKick <- struct{}{}:
	default: // a kick is already pending and will see this id
	}
}

// sendCancels sends queued FrameCancels until Close. It may sleep on a full
// request ring; Run meanwhile keeps draining responses, so the worker keeps
// making progress and frees the space.
func (g *GatewayEnd) sendCancels() {
	var batch []uint64
	for {
		select {
		case <-g.cancelKick:
		case <-g.done:
			return
		}
		g.cancelMu.Lock()
		batch, g.cancels = g.cancels, batch[:0]
		g.cancelMu.Unlock()
		for _, id := range batch {
			g.sendMu.Lock()
			err := g.seg.send(requestRing, FrameCancel, id, nil)
			g.sendMu.Unlock()
			if err != nil {
				if !errors.Is(err, ErrClosed) {
					g.log.Warn("cancel not sent", "request_id", id, "err", err)
				}
				return
			}
		}
	}
}
