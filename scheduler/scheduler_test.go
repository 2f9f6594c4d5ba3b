package scheduler

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"h3infer/config"
	"h3infer/infer"
	"h3infer/priority"
)

// fakeWorker is a worker handle whose readiness tests flip.
type fakeWorker struct {
	id     int
	slots  int
	models []string // the models it serves; none: every model
	ready  atomic.Bool
	fail   atomic.Bool // Open refuses, as a dying worker would

	mu     sync.Mutex
	active int // calls opened and not yet cancelled
	peak   int
	opened []uint64
}

func newFakeWorker(id, slots int) *fakeWorker {
	w := &fakeWorker{id: id, slots: slots}
	w.ready.Store(true)
	return w
}

func (w *fakeWorker) ID() int     { return w.id }
func (w *fakeWorker) Ready() bool { return w.ready.Load() }
func (w *fakeWorker) Slots() int  { return w.slots }

// Open starts a fake call that the test drives through its events.
func (w *fakeWorker) Open(id uint64, job *infer.Request) (infer.Call, error) {
	if w.fail.Load() {
		return nil, errors.New("ring closed")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.active++
	w.peak = max(w.peak, w.active)
	w.opened = append(w.opened, id)
	return &fakeCall{worker: w, job: *job, events: make(chan infer.Event)}, nil
}

func (w *fakeWorker) openedIDs() []uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]uint64(nil), w.opened...)
}

// fakeCall stands in for a transport call and counts cancellations.
type fakeCall struct {
	worker    *fakeWorker
	job       infer.Request
	events    chan infer.Event
	cancelled atomic.Int32
}

func (c *fakeCall) Events() <-chan infer.Event { return c.events }

func (c *fakeCall) Cancel() {
	if c.cancelled.Add(1) == 1 {
		c.worker.mu.Lock()
		c.worker.active--
		c.worker.mu.Unlock()
	}
}

type fakeSet struct {
	mu      sync.Mutex
	workers []Backend
}

func (s *fakeSet) Backends(model string) []Backend {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Backend
	for _, b := range s.workers {
		if w := b.(*fakeWorker); len(w.models) == 0 || slices.Contains(w.models, model) {
			out = append(out, w)
		}
	}
	return out
}

func (s *fakeSet) set(ws ...*fakeWorker) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.workers = s.workers[:0]
	for _, w := range ws {
		s.workers = append(s.workers, w)
	}
}

func newTestScheduler(t testing.TB, cfg Config, ws ...*fakeWorker) (*Scheduler, *fakeSet) {
	t.Helper()
	before := runtime.NumGoroutine()
	set := &fakeSet{}
	set.set(ws...)
	if cfg.UrgentReserve == nil {
		// These tests watch the queue and the slots; the reserve is
		// TestUrgentReserve's, so only a test that asks for one gets one.
		cfg.UrgentReserve = new(0)
	}
	s, err := New(cfg, set, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		s.Close()
		waitFor(t, "goroutines to exit", func() bool { return runtime.NumGoroutine() <= before })
	})
	return s, set
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

type result struct {
	st  *Dispatch
	err error
}

// submitAsync submits in a goroutine and waits until the request is queued,
// so that successive calls queue in a known order.
func submitAsync(t *testing.T, s *Scheduler, ctx context.Context, r *Request) <-chan result {
	t.Helper()
	queued := s.Stats().Queued
	out := make(chan result, 1)
	go func() {
		st, _, err := s.Submit(ctx, r)
		out <- result{st, err}
	}()
	waitFor(t, "request to queue", func() bool { return s.Stats().Queued == queued+1 })
	return out
}

func recv(t *testing.T, ch <-chan result) result {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("timed out waiting for Submit to return")
		return result{}
	}
}

func TestSubmitPicksLeastLoaded(t *testing.T) {
	tests := map[string]struct {
		slots  []int
		submit int
		want   []int // requests per worker
	}{
		"one worker":                 {slots: []int{4}, submit: 3, want: []int{3}},
		"spread evenly":              {slots: []int{2, 2}, submit: 4, want: []int{2, 2}},
		"fill by share of slots":     {slots: []int{1, 3}, submit: 4, want: []int{1, 3}},
		"larger worker takes more":   {slots: []int{2, 6}, submit: 4, want: []int{1, 3}},
		"three workers, round robin": {slots: []int{1, 1, 1}, submit: 3, want: []int{1, 1, 1}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			var ws []*fakeWorker
			for i, n := range tc.slots {
				ws = append(ws, newFakeWorker(i, n))
			}
			s, _ := newTestScheduler(t, Config{}, ws...)
			for i := range tc.submit {
				st, _, err := s.Submit(context.Background(), &Request{})
				if err != nil {
					t.Fatalf("submit %d: %v", i, err)
				}
				defer st.Close()
			}
			for i, w := range ws {
				if got := len(w.openedIDs()); got != tc.want[i] {
					t.Errorf("worker %d got %d requests, want %d", i, got, tc.want[i])
				}
			}
		})
	}
}

func TestSubmitCopiesUrgencyAndAssignsIDs(t *testing.T) {
	w := newFakeWorker(1, 2)
	s, _ := newTestScheduler(t, Config{}, w)
	a, _, err := s.Submit(context.Background(), &Request{Urgency: 1, Job: infer.Request{Model: "m", Urgency: 7}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, _, err := s.Submit(context.Background(), &Request{Urgency: 5})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if a.ID() == b.ID() {
		t.Errorf("both streams have id %d", a.ID())
	}
	job := a.current().call.(*fakeCall).job
	if job.Urgency != 1 || job.Model != "m" {
		t.Errorf("worker got urgency %d model %q, want 1 and %q", job.Urgency, job.Model, "m")
	}
	if got := a.BackendID(); got != 1 {
		t.Errorf("WorkerID = %d, want 1", got)
	}
}

func TestQueueFullIsOverloaded(t *testing.T) {
	w := newFakeWorker(0, 1)
	s, _ := newTestScheduler(t, Config{MaxQueue: 2, RetryAfter: config.Duration(3 * time.Second)}, w)
	running, _, err := s.Submit(context.Background(), &Request{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	q1 := submitAsync(t, s, ctx, &Request{})
	q2 := submitAsync(t, s, ctx, &Request{})

	_, _, err = s.Submit(context.Background(), &Request{})
	if !errors.Is(err, ErrOverloaded) {
		t.Fatalf("got %v, want ErrOverloaded", err)
	}
	var oe *OverloadError
	if !errors.As(err, &oe) || oe.RetryAfter != 3*time.Second || oe.Queued != 2 {
		t.Errorf("got %#v, want RetryAfter 3s and 2 queued", oe)
	}

	running.Close()
	r1 := recv(t, q1)
	if r1.err != nil {
		t.Fatalf("first queued request: %v", r1.err)
	}
	r1.st.Close()
	r2 := recv(t, q2)
	if r2.err != nil {
		t.Fatalf("second queued request: %v", r2.err)
	}
	r2.st.Close()
}

func TestQueueIsFIFO(t *testing.T) {
	w := newFakeWorker(0, 1)
	s, _ := newTestScheduler(t, Config{}, w)
	first, _, err := s.Submit(context.Background(), &Request{})
	if err != nil {
		t.Fatal(err)
	}
	var waiting []<-chan result
	for range 5 {
		waiting = append(waiting, submitAsync(t, s, context.Background(), &Request{}))
	}
	prev := first
	var order []uint64
	for _, ch := range waiting {
		prev.Close()
		r := recv(t, ch)
		if r.err != nil {
			t.Fatal(r.err)
		}
		order = append(order, r.st.ID())
		prev = r.st
	}
	prev.Close()
	for i := 1; i < len(order); i++ {
		if order[i] <= order[i-1] {
			t.Errorf("dispatch order %v is not submission order", order)
			break
		}
	}
	if w.peak != 1 {
		t.Errorf("worker ran %d requests at once, has 1 slot", w.peak)
	}
}

func TestDeadlineWhileQueued(t *testing.T) {
	w := newFakeWorker(0, 1)
	s, _ := newTestScheduler(t, Config{}, w)
	running, _, err := s.Submit(context.Background(), &Request{})
	if err != nil {
		t.Fatal(err)
	}
	defer running.Close()

	_, _, err = s.Submit(context.Background(), &Request{Deadline: time.Now().Add(20 * time.Millisecond)})
	if !errors.Is(err, ErrDeadline) {
		t.Fatalf("got %v, want ErrDeadline", err)
	}
	if q := s.Stats().Queued; q != 0 {
		t.Errorf("queue holds %d after the deadline, want 0", q)
	}
	_, _, err = s.Submit(context.Background(), &Request{Deadline: time.Now().Add(-time.Second)})
	if !errors.Is(err, ErrDeadline) {
		t.Errorf("past deadline: got %v, want ErrDeadline", err)
	}
}

func TestCancelWhileQueuedLeavesQueue(t *testing.T) {
	w := newFakeWorker(0, 1)
	s, _ := newTestScheduler(t, Config{}, w)
	running, _, err := s.Submit(context.Background(), &Request{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	gone := submitAsync(t, s, ctx, &Request{})
	next := submitAsync(t, s, context.Background(), &Request{})

	cancel()
	if r := recv(t, gone); !errors.Is(r.err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", r.err)
	}
	if q := s.Stats().Queued; q != 1 {
		t.Errorf("queue holds %d, want 1", q)
	}
	running.Close()
	r := recv(t, next)
	if r.err != nil {
		t.Fatal(r.err)
	}
	r.st.Close()
	if got := len(w.openedIDs()); got != 2 {
		t.Errorf("worker opened %d requests, want 2 (the cancelled one never runs)", got)
	}
}

func TestQueuedUntilWorkerReady(t *testing.T) {
	w := newFakeWorker(0, 1)
	w.ready.Store(false)
	s, _ := newTestScheduler(t, Config{}, w)
	ch := submitAsync(t, s, context.Background(), &Request{})
	w.ready.Store(true)
	// No WorkersChanged call: the poll must find the worker on its own.
	r := recv(t, ch)
	if r.err != nil {
		t.Fatal(r.err)
	}
	r.st.Close()
}

func TestRestartedWorkerIsANewHandle(t *testing.T) {
	old := newFakeWorker(0, 1)
	s, set := newTestScheduler(t, Config{}, old)
	st, _, err := s.Submit(context.Background(), &Request{})
	if err != nil {
		t.Fatal(err)
	}
	// The old handle stops being ready and is replaced; its stream stays open.
	old.ready.Store(false)
	fresh := newFakeWorker(0, 1)
	set.set(old, fresh)
	s.WorkersChanged()
	st2, _, err := s.Submit(context.Background(), &Request{})
	if err != nil {
		t.Fatal(err)
	}
	if got := len(fresh.openedIDs()); got != 1 {
		t.Errorf("fresh handle got %d requests, want 1", got)
	}
	// Ready again, the old handle still counts its open stream.
	old.ready.Store(true)
	ch := submitAsync(t, s, context.Background(), &Request{})
	st.Close()
	r := recv(t, ch)
	if r.err != nil {
		t.Fatal(r.err)
	}
	if old.peak != 1 {
		t.Errorf("old handle ran %d at once, has 1 slot", old.peak)
	}
	r.st.Close()
	st2.Close()
	if got := s.Stats(); got.Queued != 0 || got.Running != 0 || got.QueuedByUrgency != ([priority.Levels]int{}) {
		t.Errorf("stats after closing everything = %+v, want nothing queued or running", got)
	}
}

func TestStreamCloseIsIdempotent(t *testing.T) {
	w := newFakeWorker(0, 1)
	s, _ := newTestScheduler(t, Config{}, w)
	st, _, err := s.Submit(context.Background(), &Request{})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(st.Close)
	}
	wg.Wait()
	if n := st.current().call.(*fakeCall).cancelled.Load(); n != 1 {
		t.Errorf("call cancelled %d times, want 1", n)
	}
	if got := s.Stats().Running; got != 0 {
		t.Errorf("running = %d, want 0", got)
	}
}

func TestOpenFailureFreesSlot(t *testing.T) {
	w := newFakeWorker(3, 1)
	s, _ := newTestScheduler(t, Config{}, w)
	w.fail.Store(true)
	if _, _, err := s.Submit(context.Background(), &Request{}); err == nil {
		t.Fatal("submit to a refusing worker succeeded")
	}
	w.fail.Store(false)
	st, _, err := s.Submit(context.Background(), &Request{})
	if err != nil {
		t.Fatalf("slot was not freed after a failed open: %v", err)
	}
	st.Close()
}

func TestCloseFailsQueued(t *testing.T) {
	w := newFakeWorker(0, 1)
	s, _ := newTestScheduler(t, Config{}, w)
	running, _, err := s.Submit(context.Background(), &Request{})
	if err != nil {
		t.Fatal(err)
	}
	q := submitAsync(t, s, context.Background(), &Request{})
	s.Close()
	if r := recv(t, q); !errors.Is(r.err, ErrClosed) {
		t.Errorf("queued: got %v, want ErrClosed", r.err)
	}
	if _, _, err := s.Submit(context.Background(), &Request{}); !errors.Is(err, ErrClosed) {
		t.Errorf("after close: got %v, want ErrClosed", err)
	}
	running.Close() // a stream outliving its scheduler still releases cleanly
	s.Close()
}

func TestNewValidates(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	_, err := New(Config{MaxQueue: -1, RetryAfter: config.Duration(-time.Second)}, nil, log)
	if err == nil {
		t.Fatal("New accepted a negative queue, negative retry and nil backend set")
	}
	for _, want := range []string{"scheduler.max_queue", "scheduler.retry_after", "backend set"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
}

// TestConcurrentSubmitClose checks slot accounting under contention: no
// worker ever runs more than its slots and everything is released at the end.
func TestConcurrentSubmitClose(t *testing.T) {
	ws := []*fakeWorker{newFakeWorker(0, 2), newFakeWorker(1, 3)}
	s, _ := newTestScheduler(t, Config{MaxQueue: 1000}, ws...)
	var wg sync.WaitGroup
	var served atomic.Int64
	for g := range 16 {
		wg.Go(func() {
			for i := range 50 {
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(1+(g+i)%3)*time.Millisecond)
				st, _, err := s.Submit(ctx, &Request{Tenant: fmt.Sprint(g)})
				cancel()
				if err != nil {
					if !errors.Is(err, context.DeadlineExceeded) {
						t.Errorf("submit: %v", err)
					}
					continue
				}
				served.Add(1)
				if i%2 == 0 {
					runtime.Gosched()
				}
				st.Close()
			}
		})
	}
	wg.Wait()
	for _, w := range ws {
		if w.peak > w.slots {
			t.Errorf("worker %d ran %d at once, has %d slots", w.id, w.peak, w.slots)
		}
	}
	if served.Load() == 0 {
		t.Error("no request was served")
	}
	if got := s.Stats(); got.Queued != 0 || got.Running != 0 || got.QueuedByUrgency != ([priority.Levels]int{}) {
		t.Errorf("stats at rest = %+v, want nothing queued or running", got)
	}
}

func TestSetTenantsAppliesToNewRequests(t *testing.T) {
	w := newFakeWorker(1, 4)
	s, _ := newTestScheduler(t, Config{Tenants: []Tenant{{Name: "a", Weight: 1, DefaultUrgency: 5}}}, w)
	urgency := func() priority.Urgency {
		t.Helper()
		st, adm, err := s.Submit(context.Background(), &Request{Tenant: "a", DefaultUrgency: true})
		if err != nil {
			t.Fatal(err)
		}
		st.Close()
		return adm.Urgency
	}
	if got := urgency(); got != 5 {
		t.Fatalf("before: urgency %d, want 5", got)
	}
	if err := s.SetTenants([]Tenant{{Name: "a", Weight: 0}}); err == nil || !strings.Contains(err.Error(), "scheduler.tenants[0].weight") {
		t.Errorf("SetTenants with weight 0: %v, want an error naming the key", err)
	}
	if got := urgency(); got != 5 {
		t.Errorf("after a refused list: urgency %d, want the old 5", got)
	}
	if err := s.SetTenants([]Tenant{{Name: "a", Weight: 3, DefaultUrgency: 1}}); err != nil {
		t.Fatal(err)
	}
	if got := urgency(); got != 1 {
		t.Errorf("after SetTenants: urgency %d, want 1", got)
	}
}
