package scheduler

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"h3infer/transport"
)

// Worker is what the scheduler dispatches to. backend.Worker implements it;
// cmd/h3infer wires the two together.
//
// Implementations must be comparable (pointer types in practice): the
// scheduler keys its slot accounting on the handle's identity, so a restarted
// worker process must appear as a new handle. The methods are called with the
// scheduler's lock held and must not call back into the Scheduler.
type Worker interface {
	ID() int
	Ready() bool
	Slots() int
	Open(id uint64, s *transport.Submit) (*transport.Call, error)
}

// WorkerSet lists the current workers. cmd/h3infer adapts backend.Pool.
type WorkerSet interface {
	Workers() []Worker
}

// Config tunes the scheduler. Zero values mean the documented defaults.
type Config struct {
	// MaxQueue bounds the requests waiting for a slot; one more is refused
	// with an *OverloadError. Default 256.
	MaxQueue int
	// RetryAfter is the advice carried by overload errors. Default 1s.
	RetryAfter time.Duration
}

// Defaults for Config's zero values.
const (
	DefaultMaxQueue   = 256
	DefaultRetryAfter = time.Second
)

// pollInterval bounds how long a queued request waits after a worker becomes
// ready when nobody calls WorkersChanged: the backend restarts workers on its
// own schedule and the scheduler is not told otherwise.
const pollInterval = 50 * time.Millisecond

// Request is one inference request as the scheduler sees it.
type Request struct {
	Tenant   string
	Urgency  uint8     // RFC 9218 urgency, 0 most urgent; copied into Job
	Deadline time.Time // latest time the request may start; zero means none
	Job      transport.Submit
}

// Stats is a snapshot for metrics.
type Stats struct {
	Queued  int // requests waiting for a slot
	Running int // slots in use across all worker handles
}

// call is the part of *transport.Call the scheduler uses. It is a seam so
// that the scheduler's tests can dispatch without shared memory.
type call interface {
	Events() <-chan transport.Event
	Cancel()
}

// Scheduler admits requests and dispatches them to workers in FIFO order.
type Scheduler struct {
	cfg     Config
	workers WorkerSet
	log     *slog.Logger
	open    func(w Worker, id uint64, job *transport.Submit) (call, error)

	mu      sync.Mutex
	nextID  uint64
	inUse   map[Worker]int
	running int
	queue   list.List // of *waiter, oldest first
	closed  bool

	stopOnce sync.Once
	stop     chan struct{}
	done     chan struct{}
}

// waiter is a queued request. Whoever removes it from the queue (under the
// lock) sends exactly one grant on wake.
type waiter struct {
	elem *list.Element // nil once the waiter has left the queue
	wake chan grant    // buffered, so the sender never blocks under the lock
}

// grant either hands a waiter a reserved slot on worker or fails it with err.
type grant struct {
	worker Worker
	err    error
}

// New returns a scheduler over workers. It runs one goroutine, stopped by
// Close, that retries queued requests as workers come back.
func New(cfg Config, workers WorkerSet, log *slog.Logger) (*Scheduler, error) {
	var errs []error
	if cfg.MaxQueue < 0 {
		errs = append(errs, fmt.Errorf("scheduler.max_queue: must be >= 0, got %d", cfg.MaxQueue))
	}
	if cfg.RetryAfter < 0 {
		errs = append(errs, fmt.Errorf("scheduler.retry_after: must be >= 0, got %s", cfg.RetryAfter))
	}
	if workers == nil {
		errs = append(errs, errors.New("scheduler: worker set is nil"))
	}
	if log == nil {
		errs = append(errs, errors.New("scheduler: logger is nil"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if cfg.MaxQueue == 0 {
		cfg.MaxQueue = DefaultMaxQueue
	}
	if cfg.RetryAfter == 0 {
		cfg.RetryAfter = DefaultRetryAfter
	}
	s := &Scheduler{
		cfg:     cfg,
		workers: workers,
		log:     log,
		open:    openWorker,
		inUse:   make(map[Worker]int),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	go s.poll()
	return s, nil
}

func openWorker(w Worker, id uint64, job *transport.Submit) (call, error) {
	c, err := w.Open(id, job)
	if err != nil {
		return nil, err
	}
	if c == nil {
		// A nil *transport.Call in the interface would look non-nil.
		return nil, errors.New("worker returned no call")
	}
	return c, nil
}

// dispatch assigns the request an id and opens it on the least loaded
// ready worker with a free slot. When none is free it queues the request
// behind those already waiting and blocks until it is dispatched, ctx is
// done, its deadline passes or the scheduler closes. A full queue fails at
// once with an *OverloadError. Submit (stream.go) wraps it.
func (s *Scheduler) dispatch(ctx context.Context, r *Request) (*attempt, error) {
	if r == nil {
		return nil, errors.New("scheduler: submit: nil request")
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("scheduler: submit: %w", err)
	}
	if !r.Deadline.IsZero() && !time.Now().Before(r.Deadline) {
		return nil, fmt.Errorf("scheduler: submit: %w", ErrDeadline)
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, fmt.Errorf("scheduler: submit: %w", ErrClosed)
	}
	s.nextID++
	id := s.nextID
	var worker Worker
	if s.queue.Len() == 0 {
		worker = s.reserveLocked()
	}
	var w *waiter
	if worker == nil {
		if s.queue.Len() >= s.cfg.MaxQueue {
			queued := s.queue.Len()
			s.mu.Unlock()
			return nil, &OverloadError{RetryAfter: s.cfg.RetryAfter, Queued: queued}
		}
		w = &waiter{wake: make(chan grant, 1)}
		w.elem = s.queue.PushBack(w)
	}
	s.mu.Unlock()

	if w != nil {
		var err error
		worker, err = s.wait(ctx, w, r.Deadline)
		if err != nil {
			return nil, fmt.Errorf("scheduler: request %d: %w", id, err)
		}
	}

	job := r.Job
	job.Urgency = r.Urgency
	c, err := s.open(worker, id, &job)
	if err != nil {
		s.release(worker)
		return nil, fmt.Errorf("scheduler: worker %d: open request %d: %w", worker.ID(), id, err)
	}
	return &attempt{id: id, worker: worker, call: c}, nil
}

// wait blocks a queued request until it is granted a slot or gives up. A
// request that gives up after a grant raced in returns the slot.
func (s *Scheduler) wait(ctx context.Context, w *waiter, deadline time.Time) (Worker, error) {
	var expired <-chan time.Time
	if !deadline.IsZero() {
		t := time.NewTimer(time.Until(deadline))
		defer t.Stop()
		expired = t.C
	}
	var cause error
	select {
	case g := <-w.wake:
		return g.worker, g.err
	case <-ctx.Done():
		cause = ctx.Err()
	case <-expired:
		cause = ErrDeadline
	}
	s.mu.Lock()
	if w.elem != nil {
		s.queue.Remove(w.elem)
		w.elem = nil
		s.mu.Unlock()
		return nil, cause
	}
	s.mu.Unlock()
	if g := <-w.wake; g.worker != nil {
		s.release(g.worker)
	}
	return nil, cause
}

// reserveLocked takes a slot on the ready worker with the lowest share of
// its slots in use, or returns nil when every slot is taken.
func (s *Scheduler) reserveLocked() Worker {
	var best Worker
	bestUsed, bestSlots := 0, 1
	for _, w := range s.workers.Workers() {
		if w == nil || !w.Ready() {
			continue
		}
		slots, used := w.Slots(), s.inUse[w]
		if used >= slots {
			continue
		}
		// used/slots < bestUsed/bestSlots, without division.
		if best == nil || used*bestSlots < bestUsed*slots {
			best, bestUsed, bestSlots = w, used, slots
		}
	}
	if best != nil {
		s.inUse[best]++
		s.running++
	}
	return best
}

// release frees a slot on w and hands free slots to queued requests.
func (s *Scheduler) release(w Worker) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.inUse[w] - 1; n > 0 {
		s.inUse[w] = n
	} else {
		delete(s.inUse, w)
	}
	s.running--
	s.dispatchLocked()
}

// dispatchLocked grants free slots to queued requests, oldest first.
func (s *Scheduler) dispatchLocked() {
	for s.queue.Len() > 0 {
		worker := s.reserveLocked()
		if worker == nil {
			return
		}
		w := s.queue.Remove(s.queue.Front()).(*waiter)
		w.elem = nil
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
	}
}

// Stats reports the queue length and slots in use.
func (s *Scheduler) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Stats{Queued: s.queue.Len(), Running: s.running}
}

// Close fails every queued request with ErrClosed and refuses new ones.
// Streams already dispatched keep running until their owners close them.
func (s *Scheduler) Close() {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		failed := s.queue.Len()
		for e := s.queue.Front(); e != nil; e = e.Next() {
			w := e.Value.(*waiter)
			w.elem = nil
			w.wake <- grant{err: ErrClosed}
		}
		s.queue.Init()
		s.log.Info("scheduler closed", "queued_failed", failed, "running", s.running)
	}
	s.mu.Unlock()
	s.stopOnce.Do(func() { close(s.stop) })
	<-s.done
}
