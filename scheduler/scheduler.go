package scheduler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"h3infer/infer"
	"h3infer/priority"
)

// Backend is what the scheduler dispatches to: anything with a number of
// slots that can turn an infer.Request into an infer.Call. A worker
// process's handle is one; cmd/h3infer wires them in.
//
// Implementations must be comparable (pointer types in practice): the
// scheduler keys its slot accounting on the handle's identity, so a restarted
// worker process must appear as a new handle. The methods are called with the
// scheduler's lock held and must not call back into the Scheduler.
type Backend interface {
	ID() int
	Ready() bool
	Slots() int
	Open(id uint64, r *infer.Request) (infer.Call, error)
}

// BackendSet lists the current backends. cmd/h3infer joins its pool of
// worker processes and its upstream servers.
type BackendSet interface {
	// Backends lists the backends that serve model, the name a request's
	// Job carries. It is called with the scheduler's lock held, for
	// every dispatch, and must not call back into the Scheduler.
	Backends(model string) []Backend
}

// defaultCost is the fairness cost of a request that names no max_tokens.
const defaultCost = 256

// pollInterval bounds how long a queued request waits after a worker becomes
// ready when nobody calls WorkersChanged: the pool restarts workers on its
// own schedule and the scheduler is not told otherwise.
const pollInterval = 50 * time.Millisecond

// Request is one inference request as the scheduler sees it.
type Request struct {
	Tenant string // "" is DefaultTenant
	// Urgency is the RFC 9218 urgency the client asked for, 0 most urgent.
	// Submit applies the tenant's default when DefaultUrgency is set and
	// never grants more urgency than the ceilings allow; the Dispatch says
	// what it applied, and Job travels on with it and its class.
	Urgency priority.Urgency
	// DefaultUrgency says the client named no urgency.
	DefaultUrgency bool
	// UrgencyCeiling is a ceiling of this request's own on top of its
	// tenant's (its token's, say): the most urgent level it may have.
	UrgencyCeiling priority.Urgency
	Deadline       time.Time // latest time the request may start; zero means none
	Job            infer.Request
}

// Stats is a snapshot for metrics.
type Stats struct {
	Queued          int                  // requests waiting for a slot
	Running         int                  // slots in use across all worker handles
	QueuedByUrgency [priority.Levels]int // waiting requests by the urgency they were given
	// Refusals counts *OverloadError refusals by Reason since New, every
	// reason present.
	Refusals map[string]uint64
	// PredictedDelaySum and Predictions add up the waits predicted for
	// arriving requests that found no free slot, admitted or refused
	// (delay admission, measured models only); LastPredictedDelay is the
	// latest of them.
	PredictedDelaySum  time.Duration
	Predictions        uint64
	LastPredictedDelay time.Duration
	// QueueDelaySum and QueueDelays add up how long dispatched requests
	// waited in the queue, 0 for those dispatched on arrival.
	QueueDelaySum time.Duration
	QueueDelays   uint64
}

// clock is the scheduler's time source, a seam for tests with a fake clock.
type clock interface {
	Now() time.Time
	// AfterFunc calls f in its own goroutine after d; stop cancels that.
	AfterFunc(d time.Duration, f func()) (stop func() bool)
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) func() bool {
	return time.AfterFunc(d, f).Stop
}

// Scheduler admits requests and dispatches them to workers in the order
// described on queue: urgency, aging, tenant share, arrival.
type Scheduler struct {
	cfg      Config
	backends BackendSet
	log      *slog.Logger
	clock    clock

	mu      sync.Mutex
	tenants map[string]Tenant // replaced whole by SetTenants
	nextID  uint64
	inUse   map[Backend]int
	running int
	queue   *queue
	closed  bool
	rates   map[string]*serviceRate // by model
	guard   guard
	adm     admissionStats

	stopOnce sync.Once
	stop     chan struct{}
	done     chan struct{}
	// queuedKick (capacity 1) wakes poll when a request is queued.
	queuedKick chan struct{}
}

// waiter is a queued request. Whoever removes it from the queue (under the
// lock) sends exactly one grant on wake.
type waiter struct {
	tenant   string
	model    string
	urgency  priority.Urgency
	weight   float64
	cost     float64
	enqueued time.Time
	exclude  []Backend  // backends that refused the request before
	queued   bool       // in the queue; guarded by the scheduler's lock
	wake     chan grant // buffered, so the sender never blocks under the lock
	width    int        // slots the request takes: its choices (infer.Request.Slots)
}

// grant either hands a waiter a reserved slot on worker or fails it with err.
type grant struct {
	worker Backend
	err    error
}

// New returns a scheduler over backends. It runs one goroutine, stopped by
// Close, that retries queued requests as workers come back.
func New(cfg Config, backends BackendSet, log *slog.Logger) (*Scheduler, error) {
	errs := []error{cfg.Validate()}
	if backends == nil {
		errs = append(errs, errors.New("scheduler: backend set is nil"))
	}
	if log == nil {
		errs = append(errs, errors.New("scheduler: logger is nil"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	cfg = cfg.WithDefaults()
	tenants, _ := tenantTable(cfg.Tenants) // checked by Validate
	s := &Scheduler{
		cfg:      cfg,
		tenants:  tenants,
		backends: backends,
		log:      log,
		clock:    realClock{},
		inUse:    make(map[Backend]int),
		queue:    newQueue(time.Duration(cfg.Aging)),
		rates:    make(map[string]*serviceRate),
		adm:      admissionStats{refusals: make(map[string]uint64)},
		stop:     make(chan struct{}),
		done:     make(chan struct{}),

		queuedKick: make(chan struct{}, 1),
	}
	go s.poll()
	return s, nil
}

// openBackend opens job on w, into sink when sink is set and w is a
// SinkBackend; direct reports that it did.
func openBackend(w Backend, id uint64, job *infer.Request, sink *infer.Sink) (c infer.Call, direct bool, err error) {
	if sb, ok := w.(SinkBackend); ok && sink != nil {
		c, err = sb.OpenSink(id, job, sink)
		direct = true
	} else {
		c, err = w.Open(id, job)
	}
	if err != nil {
		return nil, false, err
	}
	if c == nil {
		return nil, false, errors.New("worker returned no call")
	}
	return c, direct, nil
}

// SetTenants replaces the tenant list while requests run: requests
// submitted from now on get the new shares, urgencies and bounds; queued
// ones keep the weight they were queued with. An invalid list changes
// nothing.
func (s *Scheduler) SetTenants(list []Tenant) error {
	tenants, errs := tenantTable(list)
	if err := errors.Join(errs...); err != nil {
		return err
	}
	s.mu.Lock()
	s.tenants = tenants
	s.mu.Unlock()
	s.log.Info("scheduler tenants replaced", "tenants", len(list))
	return nil
}

// tenant returns the settings that apply to name.
func (s *Scheduler) tenant(name string) Tenant {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t, ok := s.tenants[name]; ok {
		return t
	}
	return s.tenants[DefaultTenant]
}

// dispatch assigns the request an id and opens it on the least loaded
// ready worker with a free slot. When none is free it queues the request
// and blocks until it is dispatched, ctx is done, its deadline passes or the
// scheduler closes; whichever ends the wait removes it from the queue. A
// tenant over its own bound fails at once with a *TenantLimitError, a full
// queue or (delay admission) a predicted wait over MaxQueueDelay with an
// *OverloadError; the guard may fail it later with one. r.Job's Urgency and Class are those it
// applied. Submit (dispatch.go) wraps it.
//
// exclude lists backends the request must not go to: those that refused
// it before. sink, when set, is what a SinkBackend's call delivers into.
func (s *Scheduler) dispatch(ctx context.Context, r *Request, exclude []Backend, sink *infer.Sink) (*attempt, error) {
	t := s.tenant(r.Tenant)
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("scheduler: submit: %w", err)
	}
	now := s.clock.Now()
	if !r.Deadline.IsZero() && !now.Before(r.Deadline) {
		return nil, fmt.Errorf("scheduler: submit: %w", ErrDeadline)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, fmt.Errorf("scheduler: submit: %w", ErrClosed)
	}
	s.nextID++
	id := s.nextID
	width := r.Job.Slots()
	if most, ok := s.widestLocked(r.Job.Model, r.Job.Urgency); ok && width > most {
		s.mu.Unlock()
		return nil, &ChoicesError{Choices: width, Most: most}
	}
	var worker Backend
	if s.queue.len() == 0 {
		worker = s.reserveLocked(r.Job.Model, r.Job.Urgency, exclude, width)
	}
	var w *waiter
	if worker == nil {
		if t.MaxQueue > 0 && s.queue.tenantLen(t.Name) >= t.MaxQueue {
			queued := s.queue.tenantLen(t.Name)
			s.mu.Unlock()
			return nil, &TenantLimitError{Tenant: t.Name, RetryAfter: time.Duration(s.cfg.RetryAfter), Queued: queued}
		}
		if s.queue.len() >= s.cfg.MaxQueue {
			err := s.overloadLocked(ReasonQueueFull, r.Job.Model)
			s.mu.Unlock()
			return nil, err
		}
		// A re-dispatch (exclude set) was admitted once already; and a
		// request its model has a free slot for waits for none.
		if s.byDelay() && exclude == nil && s.pickLocked(r.Job.Model, r.Job.Urgency, nil, width) == nil {
			if wait, ok := s.predictLocked(r.Job.Model, r.Job.Urgency, now); ok {
				s.adm.predictedSum += wait.Seconds()
				s.adm.predictions++
				s.adm.lastPrediction = wait
				if wait > time.Duration(s.cfg.MaxQueueDelay) {
					err := s.overloadLocked(ReasonPredictedDelay, r.Job.Model)
					s.mu.Unlock()
					return nil, err
				}
			}
		}
		cost := float64(r.Job.MaxTokens)
		if cost == 0 {
			cost = defaultCost
		}
		cost *= float64(width)
		w = &waiter{
			tenant:   t.Name,
			model:    r.Job.Model,
			exclude:  exclude,
			urgency:  r.Job.Urgency,
			weight:   float64(t.Weight),
			cost:     cost,
			enqueued: now,
			wake:     make(chan grant, 1),
			width:    width,
		}
		s.queue.push(w)
		select {
		case s.queuedKick <- struct{}{}: // poll ticks again
		default: // a kick is pending already
		}
		// A slot may be free with others queued (a worker came back and
		// the poll has not run yet); the queue decides who takes it.
		s.dispatchLocked()
	}
	if w == nil {
		s.adm.queueDelays++ // dispatched on arrival: no wait
	}
	s.mu.Unlock()

	if w != nil {
		var err error
		worker, err = s.wait(ctx, w, r.Deadline)
		if err != nil {
			return nil, fmt.Errorf("scheduler: request %d: %w", id, err)
		}
	}
	c, direct, err := openBackend(worker, id, &r.Job, sink)
	if err != nil {
		s.release(worker, width)
		return nil, fmt.Errorf("scheduler: worker %d: open request %d: %w", worker.ID(), id, err)
	}
	return &attempt{id: id, worker: worker, call: c, direct: direct}, nil
}

// wait blocks a queued request until it is granted a slot or gives up. The
// deadline timer fails it from the queue like a grant would; a request
// that gives up after a grant raced in returns the slot.
func (s *Scheduler) wait(ctx context.Context, w *waiter, deadline time.Time) (Backend, error) {
	if !deadline.IsZero() {
		stop := s.clock.AfterFunc(deadline.Sub(w.enqueued), func() { s.fail(w, ErrDeadline) })
		defer stop()
	}
	select {
	case g := <-w.wake:
		return g.worker, g.err
	case <-ctx.Done():
	}
	if s.fail(w, ctx.Err()) {
		g := <-w.wake
		return nil, g.err
	}
	// Someone else removed it first: take what they sent.
	g := <-w.wake
	if g.worker != nil {
		s.release(g.worker, w.width)
		return nil, ctx.Err()
	}
	return nil, g.err
}

// fail removes w from the queue and wakes it with err, unless it already
// left the queue. It reports whether it did.
func (s *Scheduler) fail(w *waiter, err error) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.queue.remove(w) {
		return false
	}
	w.wake <- grant{err: err}
	return true
}

// reserveLocked takes width slots (one per choice) for a request for
// model of effective urgency level on the ready backend of that model
// with the lowest share of its slots in use, skipping those in exclude,
// or returns nil when no backend has that many of the slots it may use
// free.
func (s *Scheduler) reserveLocked(model string, level priority.Urgency, exclude []Backend, width int) Backend {
	best := s.pickLocked(model, level, exclude, width)
	if best != nil {
		s.inUse[best] += width
		s.running += width
	}
	return best
}

// pickLocked is reserveLocked without the reservation.
func (s *Scheduler) pickLocked(model string, level priority.Urgency, exclude []Backend, width int) Backend {
	reserve := 0
	if s.cfg.Classes.Of(level) != priority.Urgent {
		reserve = *s.cfg.UrgentReserve
	}
	var best Backend
	bestUsed, bestSlots := 0, 1
	for _, w := range s.backends.Backends(model) {
		if w == nil || !w.Ready() || slices.Contains(exclude, w) {
			continue
		}
		slots, used := w.Slots(), s.inUse[w]
		if used+width > openSlots(slots, reserve) {
			continue
		}
		// used/slots < bestUsed/bestSlots, without division.
		if best == nil || used*bestSlots < bestUsed*slots {
			best, bestUsed, bestSlots = w, used, slots
		}
	}
	return best
}

// servedElsewhere reports whether model has a backend, ready or not, that
// is none of exclude.
func (s *Scheduler) servedElsewhere(model string, exclude []Backend) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, b := range s.backends.Backends(model) {
		if b != nil && !slices.Contains(exclude, b) {
			return true
		}
	}
	return false
}

// complete frees the width slots of a dispatch of a request for model
// that ran,
// and counts it towards the model's service rate.
func (s *Scheduler) complete(w Backend, model string, width int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.rates[model]
	if r == nil {
		r = &serviceRate{}
		s.rates[model] = r
	}
	r.complete(s.clock.Now(), s.queue.modelLen(model) > 0)
	s.releaseLocked(w, width)
}

// release frees width slots on w and hands free slots to queued
// requests.
func (s *Scheduler) release(w Backend, width int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.releaseLocked(w, width)
}

func (s *Scheduler) releaseLocked(w Backend, width int) {
	if n := s.inUse[w] - width; n > 0 {
		s.inUse[w] = n
	} else {
		delete(s.inUse, w)
	}
	s.running -= width
	s.dispatchLocked()
}

// dispatchLocked grants free slots to queued requests in queue order.
func (s *Scheduler) dispatchLocked() {
	now := s.clock.Now()
	s.guardLocked(now)
	s.queue.lifo = s.cfg.LIFO && s.guard.failing
	for s.queue.len() > 0 {
		var worker Backend
		w := s.queue.pop(now, func(w *waiter, level int) bool {
			worker = s.reserveLocked(w.model, priority.Urgency(level), w.exclude, w.width)
			return worker != nil
		})
		if w == nil {
			return
		}
		s.adm.queueDelaySum += now.Sub(w.enqueued).Seconds()
		s.adm.queueDelays++
		w.wake <- grant{worker: worker}
	}
}

// WorkersChanged tells the scheduler that a worker became ready or gained
// slots, so queued requests start without waiting for the next poll.
func (s *Scheduler) WorkersChanged() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dispatchLocked()
}

// poll runs WorkersChanged every pollInterval while requests are queued.
// With none queued it parks until one is (queuedKick): a ticker that ran
// on an idle gateway kept waking the Go runtime's monitor thread, which
// then polled every 20 µs for a while after each tick, about 2% of a core
// for nothing (docs/BENCHMARKS.md). The tick that finds the queue empty
// still runs WorkersChanged, so the admission guard resets as before.
func (s *Scheduler) poll() {
	defer close(s.done)
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			s.WorkersChanged()
		}
		s.mu.Lock()
		idle := s.queue.len() == 0
		s.mu.Unlock()
		if !idle {
			continue
		}
		t.Stop()
		select {
		case <-s.stop:
			return
		case <-s.queuedKick:
		}
		t.Reset(pollInterval)
	}
}

// Stats reports the queue length, slots in use and admission counters.
func (s *Scheduler) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	refusals := map[string]uint64{ReasonQueueFull: 0, ReasonPredictedDelay: 0, ReasonQueueDelay: 0}
	for r, n := range s.adm.refusals {
		refusals[r] = n
	}
	return Stats{
		Queued:             s.queue.len(),
		Running:            s.running,
		QueuedByUrgency:    s.queue.byUrgency(),
		Refusals:           refusals,
		PredictedDelaySum:  seconds(s.adm.predictedSum),
		Predictions:        s.adm.predictions,
		LastPredictedDelay: s.adm.lastPrediction,
		QueueDelaySum:      seconds(s.adm.queueDelaySum),
		QueueDelays:        s.adm.queueDelays,
	}
}

// Close fails every queued request with ErrClosed and refuses new ones.
// Requests already dispatched keep running until their owners close them.
func (s *Scheduler) Close() {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		failed := s.queue.drain()
		for _, w := range failed {
			w.wake <- grant{err: ErrClosed}
		}
		s.log.Info("scheduler closed", "queued_failed", len(failed), "running", s.running)
	}
	s.mu.Unlock()
	s.stopOnce.Do(func() { close(s.stop) })
	<-s.done
}
