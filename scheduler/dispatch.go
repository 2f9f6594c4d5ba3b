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
	a, err := s.dispatch(ctx, &req, nil)
	if err != nil {
		return nil, adm, err
	}
	d := &Dispatch{sched: s, req: req, cur: a, slotHeld: true, out: make(chan infer.Event), stop: make(chan struct{})}
	// Re-dispatch waits on the same terms as the first dispatch: it gives
	// up when the client leaves or the dispatch is closed.
	d.ctx, d.cancel = context.WithCancel(ctx)
	d.wg.Go(d.forward)
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
// Events pass through a goroutine of the Dispatch, which is what lets it
// swap a dead worker's call for a new one under a channel the consumer
// already holds. The hand-off is unbuffered, so the bound on unread events
// stays the transport call's: a consumer that stops reading still overflows
// its call and gets cancelled. The cost is one goroutine hand-off per
// event. Only the first event is ever intercepted, but a consumer ranges
// over one channel from start to end and a Go channel cannot be rewound,
// so whatever inspects the first event must pass on the rest as well.
//
// Forwarding ends on Close, not when the request's context ends: a
// consumer that sees its context end decides itself what that means (a
// passed deadline is not a dispatch that ended without a result).
type Dispatch struct {
	sched  *Scheduler
	req    Request
	ctx    context.Context // bounds a re-dispatch's wait
	cancel context.CancelFunc
	out    chan infer.Event // closed after the terminal event
	stop   chan struct{}    // closed by Close
	wg     sync.WaitGroup   // forward

	mu       sync.Mutex
	cur      *attempt
	slotHeld bool      // cur.worker's slot is still reserved for this dispatch
	moves    int       // re-dispatches after a lost worker so far
	refused  []Backend // backends that refused the request, in order
	once     sync.Once
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
	next, err := s.dispatch(d.ctx, &d.req, exclude)
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
