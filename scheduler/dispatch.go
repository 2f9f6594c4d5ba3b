package scheduler

import (
	"context"
	"errors"
	"slices"
	"sync"

	"h3infer/infer"
	"h3infer/priority"
)

// maxRedispatch bounds how often one request moves to another worker after
// its worker died before it started. A request that itself kills workers
// (a poison prompt) must not take the whole pool down one by one.
const maxRedispatch = 2

// maxElsewhere bounds how often one request moves to another backend after
// a backend refused it or failed before it began (infer.Error.Unstarted):
// once, so that a request every backend refuses is answered with the
// refusal at once rather than after a tour of them all.
const maxElsewhere = 1

// attempt is one dispatch of a request: the worker slot it holds and the
// call on that worker's ring.
type attempt struct {
	id     uint64
	worker Backend
	call   infer.Call
	direct bool // the call delivers into the Dispatch's sink
}

// SinkBackend is a Backend whose calls can deliver into a channel the
// scheduler gives them (infer.Sink). A request on one reaches its consumer
// with no goroutine of the Dispatch between them; a request on any other
// Backend has its events forwarded by one.
type SinkBackend interface {
	Backend
	OpenSink(id uint64, r *infer.Request, sink *infer.Sink) (infer.Call, error)
}

// Submit assigns the request an id and dispatches it to the least loaded
// ready worker with a free slot. When none is free it queues the request
// and blocks until it is dispatched, ctx is done, its deadline passes or the
// scheduler closes; whichever ends the wait removes it from the queue. A
// tenant over its own bound fails at once with a *TenantLimitError, a full
// queue with an *OverloadError.
//
// A request whose worker dies before the request produced any event (it
// was waiting in the worker's batch, or prefilling) is dispatched again, to
// another worker when one is free, up to maxRedispatch times: the caller
// never learns of it. It queues anew, behind the requests of its urgency
// already waiting, on the terms above; if it is not admitted the dispatch
// ends with the worker_lost error. Once an event has been handed on, a
// dying worker ends the dispatch with the worker_lost error event.
//
// Likewise a request that a backend refuses, or fails before it began
// (its first event is an infer.Error marked Unstarted: an upstream's 503,
// a connection refused), moves once to another backend of its model,
// never back to one that refused it; when the model has no other backend
// the refusal is the answer.
//
// Submit does not modify r. It returns the Admission it decided, also
// when it refused the request, and the request the worker gets carries
// the same urgency and class. ctx bounds the request's whole life, the
// wait for a re-dispatch included. The caller must Close the returned
// Dispatch.
func (s *Scheduler) Submit(ctx context.Context, r *Request) (*Dispatch, Admission, error) {
	if r == nil {
		return nil, Admission{}, errors.New("scheduler: submit: nil request")
	}
	// The copy carries what admit decided, so a re-dispatch competes at
	// the same level.
	req := s.admit(*r)
	adm := Admission{Urgency: req.Job.Urgency, Class: req.Job.Class}
	d := &Dispatch{sched: s, req: req, stop: make(chan struct{}), opened: make(chan struct{})}
	d.sink.Divert = d.divert
	a, err := s.dispatch(ctx, &req, nil, &d.sink)
	if err != nil {
		return nil, adm, err
	}
	// Re-dispatch waits on the same terms as the first dispatch: it gives
	// up when the client leaves or the dispatch is closed.
	d.ctx, d.cancel = context.WithCancel(ctx)
	d.mu.Lock()
	d.cur, d.slotHeld = a, true
	d.forwarding = !a.direct
	d.mu.Unlock()
	if a.direct {
		d.out = d.sink.Events
	} else {
		d.out = make(chan infer.Event)
		d.wg.Go(d.forward)
	}
	close(d.opened)
	return d, adm, nil
}

// Admission is what Submit decided about a request's priority.
type Admission struct {
	Urgency priority.Urgency
	Class   priority.Class
}

// Dispatch is one dispatched request: its events come from the worker that
// runs it.
//
// A call on a SinkBackend (a local worker) delivers straight into the
// channel Events returns, which the Dispatch gave it (infer.Sink): no
// goroutine stands between the worker's ring and the consumer. The call
// offers the Dispatch its first event when that is an error (divert); one
// that allows a re-dispatch (see Submit) is taken, and the request's next
// call delivers into the same channel, so the consumer never sees the
// swap. The bound on unread events stays the call's: a consumer that stops
// reading still overflows its call and gets cancelled.
//
// A call on any other Backend keeps a channel of its own, and a goroutine
// of the Dispatch forwards its events, unbuffered, intercepting the first
// as above; once a request is forwarded, its re-dispatches are too.
//
// Events end on Close, not when the request's context ends: a consumer
// that sees its context end decides itself what that means (a passed
// deadline is not a dispatch that ended without a result).
type Dispatch struct {
	sched  *Scheduler
	req    Request
	ctx    context.Context // bounds a re-dispatch's wait
	cancel context.CancelFunc
	out    chan infer.Event // closed after the terminal event
	stop   chan struct{}    // closed by Close
	opened chan struct{}    // closed once Submit has set cur and out
	sink   infer.Sink       // what the direct calls deliver into: out
	wg     sync.WaitGroup   // forward, recover
	// retryMu serializes recover's goroutines: each decides on the state
	// the one before it left.
	retryMu sync.Mutex

	mu         sync.Mutex
	cur        *attempt
	slotHeld   bool      // cur.worker's slot is still reserved for this dispatch
	forwarding bool      // events pass through forward: calls get no sink
	closing    bool      // Close has begun: divert takes nothing more
	moves      int       // re-dispatches after a lost worker so far
	refused    []Backend // backends that refused the request, in order
	once       sync.Once
}

func (d *Dispatch) current() *attempt {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cur
}

// admit decides r's urgency and class: the tenant's default urgency when
// the client named none, never more urgent than the tenant's ceiling or
// the request's own, and the class that urgency falls in.
func (s *Scheduler) admit(r Request) Request {
	t := s.tenant(r.Tenant)
	u := r.Urgency
	if r.DefaultUrgency {
		u = t.DefaultUrgency
	}
	u = min(max(u, t.UrgencyCeiling, r.UrgencyCeiling), priority.Least)
	r.Job.Urgency, r.Job.Class = u, s.cfg.Classes.Of(u)
	return r
}

// ID is the request id the scheduler assigned; it names the sequence on the
// worker's ring and in logs. It changes when the request is re-dispatched.
func (d *Dispatch) ID() uint64 { return d.current().id }

// WorkerID names the worker running the request.
func (d *Dispatch) BackendID() int { return d.current().worker.ID() }

// Events delivers the worker's tokens and, last, its done or error event;
// the channel is closed after it.
func (d *Dispatch) Events() <-chan infer.Event { return d.out }

// forward hands on the request's events until the terminal one or Close.
// Until the first event has gone out, an event saying the worker died
// makes it dispatch the request again instead.
func (d *Dispatch) forward() {
	defer close(d.out)
	started := false
	a := d.current()
	for {
		var (
			ev infer.Event
			ok bool
		)
		select {
		case ev, ok = <-a.call.Events():
		case <-d.stop:
			return
		}
		if !ok {
			return // ended without a result: the consumer sees the close
		}
		if !started && ev.Err != nil {
			if next := d.retry(a, ev.Err); next != nil {
				a = next
				continue
			}
		}
		started = true
		select {
		case d.out <- ev:
		case <-d.stop:
			return
		}
		if ev.Done != nil || ev.Err != nil {
			return
		}
	}
}

// divert is the sink's Divert: it takes a direct call's first event when
// that error may allow a re-dispatch, which recover then decides and does
// in a goroutine of the Dispatch (the caller is the ring's receive loop,
// which must not wait for a free slot).
func (d *Dispatch) divert(e *infer.Error) bool {
	if e.Code != infer.CodeWorkerLost && !e.Unstarted {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closing {
		return false // delivered as it is: nobody waits for a re-dispatch
	}
	d.wg.Add(1)
	go d.recover(e)
	return true
}

// recover dispatches the request again after divert took its first event,
// failure, or delivers failure and ends the events when the request stays
// with it. A re-dispatch that lands on a Backend that is not a
// SinkBackend is forwarded from then on.
func (d *Dispatch) recover(failure *infer.Error) {
	defer d.wg.Done()
	<-d.opened // a fast failure may come before Submit has returned
	d.retryMu.Lock()
	defer d.retryMu.Unlock()
	next := d.retry(d.current(), failure)
	if next == nil {
		// Nothing else writes out: the failed call ended without it.
		d.out <- infer.Event{Err: failure}
		close(d.out)
		return
	}
	if !next.direct {
		d.mu.Lock()
		d.forwarding = true
		d.mu.Unlock()
		d.forward()
	}
}

// retry dispatches the request again after its first event was the error
// failure, when the failure allows it (see Submit), and returns the new
// attempt, or nil when the request stays with failure.
func (d *Dispatch) retry(old *attempt, failure *infer.Error) *attempt {
	switch {
	case failure.Code == infer.CodeWorkerLost && d.moves < maxRedispatch:
		return d.redispatch(old, failure, nil)
	case failure.Unstarted && len(d.refused) < maxElsewhere:
		exclude := append(slices.Clip(d.refused), old.worker)
		if !d.sched.servedElsewhere(d.req.Job.Model, exclude) {
			return nil
		}
		next := d.redispatch(old, failure, exclude)
		if next != nil {
			d.refused = exclude
		}
		return next
	}
	return nil
}

// redispatch frees the old backend's slot and submits the request anew,
// to none of exclude. It returns nil, keeping the old attempt, when no
// backend takes the request before the dispatch's context or the
// request's deadline ends.
func (d *Dispatch) redispatch(old *attempt, lost *infer.Error, exclude []Backend) *attempt {
	s := d.sched
	// The slot goes back first: with every other slot busy the request must
	// not wait on its own. The dead worker cannot take it again, because the
	// pool marks a worker not ready before its calls fail.
	d.mu.Lock()
	d.slotHeld = false
	d.mu.Unlock()
	s.release(old.worker, d.req.Job.Slots())
	d.mu.Lock()
	sink := &d.sink
	if d.forwarding {
		sink = nil
	}
	d.mu.Unlock()
	next, err := s.dispatch(d.ctx, &d.req, exclude, sink)
	if err != nil {
		if d.ctx.Err() == nil {
			s.log.Warn("request lost its worker and could not be dispatched again",
				"request_id", old.id, "worker", old.worker.ID(), "err", err)
		}
		return nil
	}
	d.mu.Lock()
	d.cur, d.slotHeld = next, true
	if exclude == nil {
		d.moves++
	}
	d.mu.Unlock()
	s.log.Info("request re-dispatched before it started",
		"request_id", old.id, "new_request_id", next.id, "from_backend", old.worker.ID(),
		"to_backend", next.worker.ID(), "code", lost.Code, "reason", lost.Message)
	return next
}

// Close cancels the request if it is still running, frees its worker slot
// and dispatches the next queued request. It is safe to call more than once
// and from any goroutine.
func (d *Dispatch) Close() {
	d.once.Do(func() {
		d.mu.Lock()
		d.closing = true
		d.mu.Unlock()
		d.cancel()
		close(d.stop)
		d.wg.Wait()
		d.mu.Lock()
		a, held := d.cur, d.slotHeld
		d.slotHeld = false
		d.mu.Unlock()
		a.call.Cancel()
		if held {
			d.sched.complete(a.worker, d.req.Job.Model, d.req.Job.Slots())
		}
	})
}
