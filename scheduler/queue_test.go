package scheduler

import (
	"context"
	"errors"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"h3infer/config"
	"h3infer/priority"
)

// fakeClock is a manual clock: timers fire only when a test advances it.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	at      time.Time
	f       func()
	stopped bool
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) func() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{at: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		was := !t.stopped
		t.stopped = true
		return was
	}
}

// Advance moves time on and runs the timers that came due, outside the
// clock's lock as real timers would.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due []func()
	for _, t := range c.timers {
		if !t.stopped && !t.at.After(c.now) {
			t.stopped = true
			due = append(due, t.f)
		}
	}
	c.mu.Unlock()
	for _, f := range due {
		f()
	}
}

// pending counts timers not yet fired or stopped.
func (c *fakeClock) pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, t := range c.timers {
		if !t.stopped {
			n++
		}
	}
	return n
}

type item struct {
	name    string
	tenant  string
	urgency priority.Urgency
	weight  float64
	at      time.Duration // enqueued this long after the start
}

func admitAll(*waiter, int) bool { return true }

func popNames(q *queue, now time.Time, n int) []string {
	var out []string
	for range n {
		w := q.pop(now, admitAll)
		if w == nil {
			break
		}
		out = append(out, w.tenant+"/"+itoa(int(w.urgency))+"/"+itoa(int(w.cost)))
	}
	return out
}

func itoa(i int) string {
	if i < 10 {
		return string(rune('0' + i))
	}
	return itoa(i/10) + itoa(i%10)
}

func TestQueueOrder(t *testing.T) {
	start := time.Unix(0, 0)
	tests := map[string]struct {
		aging time.Duration
		items []item
		now   time.Duration
		want  []string // tenant/urgency/cost, where cost numbers the items
	}{
		"strict priority by urgency": {
			aging: time.Hour,
			items: []item{{urgency: 6}, {urgency: 3}, {urgency: 0}, {urgency: 6}, {urgency: 7}},
			want:  []string{"t/0/3", "t/3/2", "t/6/1", "t/6/4", "t/7/5"},
		},
		"oldest first within an urgency": {
			aging: time.Hour,
			items: []item{{urgency: 4}, {urgency: 4}, {urgency: 4}},
			want:  []string{"t/4/1", "t/4/2", "t/4/3"},
		},
		"aging lifts one level per step": {
			// u=5 enqueued at 0 has waited 3 steps at 3s: effective 2, ahead
			// of a fresh u=3 but behind a fresh u=1.
			aging: time.Second,
			items: []item{{urgency: 5}, {urgency: 3, at: 3 * time.Second}, {urgency: 1, at: 3 * time.Second}},
			now:   3 * time.Second,
			want:  []string{"t/1/3", "t/5/1", "t/3/2"},
		},
		"aging bound: after u steps a request passes later urgent ones": {
			aging: time.Second,
			items: []item{{urgency: 7}, {urgency: 0, at: 6 * time.Second}, {urgency: 0, at: 7 * time.Second}},
			now:   7 * time.Second,
			want:  []string{"t/7/1", "t/0/2", "t/0/3"},
		},
		"not yet at the bound it still waits": {
			aging: time.Second,
			items: []item{{urgency: 7}, {urgency: 0, at: 6 * time.Second}},
			now:   7*time.Second - time.Nanosecond,
			want:  []string{"t/0/2", "t/7/1"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			q := newQueue(tc.aging)
			for i, it := range tc.items {
				q.push(&waiter{tenant: "t", urgency: it.urgency, weight: 1, cost: float64(i + 1), enqueued: start.Add(it.at)})
			}
			got := popNames(q, start.Add(tc.now), len(tc.items)+1)
			if !equal(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
			if q.len() != 0 || len(q.counts) != 0 {
				t.Errorf("queue not empty after popping everything: %d items, counts %v", q.len(), q.counts)
			}
		})
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// serveShares pops n requests and counts the cost served per tenant.
func serveShares(q *queue, now time.Time, n int) map[string]float64 {
	got := map[string]float64{}
	for range n {
		w := q.pop(now, admitAll)
		if w == nil {
			break
		}
		got[w.tenant] += w.cost
	}
	return got
}

func TestQueueFairnessByWeight(t *testing.T) {
	now := time.Unix(0, 0)
	q := newQueue(time.Hour)
	for range 100 {
		q.push(&waiter{tenant: "a", urgency: 5, weight: 3, cost: 16, enqueued: now})
		q.push(&waiter{tenant: "b", urgency: 5, weight: 1, cost: 16, enqueued: now})
	}
	got := serveShares(q, now, 40)
	if got["a"] != 30*16 || got["b"] != 10*16 {
		t.Errorf("served tokens a=%v b=%v, want 480 and 160 (3:1)", got["a"], got["b"])
	}

	// Shares count tokens, not requests: b asking for 4x as many tokens per
	// request gets a quarter as many requests at equal weight.
	q = newQueue(time.Hour)
	for range 100 {
		q.push(&waiter{tenant: "a", urgency: 2, weight: 1, cost: 8, enqueued: now})
		q.push(&waiter{tenant: "b", urgency: 2, weight: 1, cost: 32, enqueued: now})
	}
	got = serveShares(q, now, 50)
	if got["a"] != 40*8 || got["b"] != 10*32 {
		t.Errorf("served tokens a=%v b=%v, want 320 each", got["a"], got["b"])
	}
}

func TestQueueIdleTenantBanksNoCredit(t *testing.T) {
	now := time.Unix(0, 0)
	q := newQueue(time.Hour)
	for range 100 {
		q.push(&waiter{tenant: "a", urgency: 4, weight: 1, cost: 1, enqueued: now})
	}
	serveShares(q, now, 90)
	for range 10 {
		q.push(&waiter{tenant: "b", urgency: 4, weight: 1, cost: 1, enqueued: now})
	}
	// b was idle while a took 90: it now gets half, not the next ten.
	got := serveShares(q, now, 10)
	if got["a"] != 5 || got["b"] != 5 {
		t.Errorf("after b arrived: a=%v b=%v, want 5 and 5", got["a"], got["b"])
	}
}

func TestQueueUrgencyBeatsWeight(t *testing.T) {
	now := time.Unix(0, 0)
	q := newQueue(time.Hour)
	for range 10 {
		q.push(&waiter{tenant: "heavy", urgency: 6, weight: 100, cost: 1, enqueued: now})
	}
	q.push(&waiter{tenant: "light", urgency: 1, weight: 1, cost: 1, enqueued: now})
	if w := q.pop(now, admitAll); w.tenant != "light" {
		t.Errorf("first served %s, want the urgent light tenant", w.tenant)
	}
}

// fakeClockScheduler is a scheduler on a fake clock with one single-slot
// worker already busy, so that every further request queues.
func fakeClockScheduler(t *testing.T, cfg Config) (*Scheduler, *fakeClock, *fakeWorker, *Dispatch) {
	t.Helper()
	w := newFakeWorker(0, 1)
	s, _ := newTestScheduler(t, cfg, w)
	clk := newFakeClock()
	s.clock = clk
	s.queue = newQueue(time.Duration(s.cfg.Aging))
	busy, _, err := s.Submit(context.Background(), &Request{})
	if err != nil {
		t.Fatal(err)
	}
	return s, clk, w, busy
}

func TestSchedulerDispatchesByUrgency(t *testing.T) {
	s, _, w, busy := fakeClockScheduler(t, Config{})
	var chans []<-chan result
	for _, u := range []priority.Urgency{7, 3, 0, 5} {
		chans = append(chans, submitAsync(t, s, context.Background(), &Request{Urgency: u}))
	}
	if got := s.Stats().QueuedByUrgency; got[0] != 1 || got[3] != 1 || got[5] != 1 || got[7] != 1 {
		t.Errorf("QueuedByUrgency = %v", got)
	}
	prev := busy
	var order []priority.Urgency
	for range chans {
		prev.Close()
		var r result
		for i, ch := range chans {
			select {
			case r = <-ch:
				chans[i] = nil
			default:
				continue
			}
			break
		}
		if r.st == nil {
			// The grant is sent under the lock before Close returns, but
			// Submit's goroutine may not have read it yet.
			r = recvAny(t, chans)
		}
		if r.err != nil {
			t.Fatal(r.err)
		}
		order = append(order, r.st.current().call.(*fakeCall).job.Urgency)
		prev = r.st
	}
	prev.Close()
	if want := []priority.Urgency{0, 3, 5, 7}; !slices.Equal(order, want) {
		t.Errorf("dispatch order by urgency %v, want %v", order, want)
	}
	if w.peak != 1 {
		t.Errorf("worker ran %d at once, has one slot", w.peak)
	}
}

// recvAny waits for the first result on any of chans, niling its entry.
func recvAny(t *testing.T, chans []<-chan result) result {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		for i, ch := range chans {
			if ch == nil {
				continue
			}
			select {
			case r := <-ch:
				chans[i] = nil
				return r
			default:
			}
		}
		select {
		case <-deadline:
			t.Fatal("no queued request was dispatched")
		case <-time.After(time.Millisecond):
		}
	}
}

func TestSchedulerAgingOnFakeClock(t *testing.T) {
	s, clk, _, busy := fakeClockScheduler(t, Config{Aging: config.Duration(time.Second)})
	bulk := submitAsync(t, s, context.Background(), &Request{Urgency: 7})
	clk.Advance(7 * time.Second)
	urgent := submitAsync(t, s, context.Background(), &Request{Urgency: 0})
	busy.Close()
	r := recv(t, bulk)
	if r.err != nil {
		t.Fatal(r.err)
	}
	select {
	case <-urgent:
		t.Fatal("the fresh urgent request ran before the aged bulk one")
	default:
	}
	r.st.Close()
	if r := recv(t, urgent); r.err != nil {
		t.Fatal(r.err)
	} else {
		r.st.Close()
	}
}

func TestSchedulerDeadlineOnFakeClock(t *testing.T) {
	s, clk, w, busy := fakeClockScheduler(t, Config{})
	start := clk.Now()
	late := submitAsync(t, s, context.Background(), &Request{Deadline: start.Add(2 * time.Second)})
	other := submitAsync(t, s, context.Background(), &Request{Deadline: start.Add(time.Hour)})
	clk.Advance(time.Second)
	select {
	case r := <-late:
		t.Fatalf("returned before its deadline: %v", r.err)
	default:
	}
	clk.Advance(time.Second)
	if r := recv(t, late); !errors.Is(r.err, ErrDeadline) {
		t.Fatalf("got %v, want ErrDeadline", r.err)
	}
	if q := s.Stats().Queued; q != 1 {
		t.Errorf("queue holds %d, want 1", q)
	}
	busy.Close()
	r := recv(t, other)
	if r.err != nil {
		t.Fatal(r.err)
	}
	r.st.Close()
	if got := len(w.openedIDs()); got != 2 {
		t.Errorf("worker opened %d requests, want 2: the expired one must never reach it", got)
	}
	waitFor(t, "deadline timers to stop", func() bool { return clk.pending() == 0 })
}

func TestSchedulerBounds(t *testing.T) {
	cfg := Config{MaxQueue: 3, RetryAfter: config.Duration(2 * time.Second), Tenants: []Tenant{
		{Name: "a", Weight: 1, DefaultUrgency: 3, MaxQueue: 1},
		{Name: "b", Weight: 1, DefaultUrgency: 3},
	}}
	s, _, _, busy := fakeClockScheduler(t, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a1 := submitAsync(t, s, ctx, &Request{Tenant: "a"})
	_, _, err := s.Submit(ctx, &Request{Tenant: "a"})
	var tl *TenantLimitError
	if !errors.Is(err, ErrTenantLimit) || !errors.As(err, &tl) || tl.Tenant != "a" || tl.RetryAfter != 2*time.Second || tl.Queued != 1 {
		t.Errorf("tenant a over its bound: got %v, want a *TenantLimitError for a, 1 queued, retry 2s", err)
	}
	if errors.Is(err, ErrOverloaded) {
		t.Error("a tenant limit must not read as overload")
	}
	b1 := submitAsync(t, s, ctx, &Request{Tenant: "b"})
	b2 := submitAsync(t, s, ctx, &Request{Tenant: "b"})
	_, _, err = s.Submit(ctx, &Request{Tenant: "b"})
	var oe *OverloadError
	if !errors.As(err, &oe) || oe.Queued != 3 || errors.Is(err, ErrTenantLimit) {
		t.Errorf("global bound: got %v, want an *OverloadError with 3 queued", err)
	}
	cancel()
	for _, ch := range []<-chan result{a1, b1, b2} {
		if r := recv(t, ch); !errors.Is(r.err, context.Canceled) {
			t.Errorf("got %v, want context.Canceled", r.err)
		}
	}
	if q := s.Stats().Queued; q != 0 {
		t.Errorf("queue holds %d after every client left", q)
	}
	busy.Close()
}

func TestSchedulerTenantUrgency(t *testing.T) {
	cfg := Config{Tenants: []Tenant{{Name: "batch", Weight: 1, DefaultUrgency: 6, UrgencyCeiling: 4}}}
	s, _ := newTestScheduler(t, cfg, newFakeWorker(0, 8))
	tests := map[string]struct {
		req  Request
		want priority.Urgency
	}{
		"tenant default":            {Request{Tenant: "batch", DefaultUrgency: true}, 6},
		"below the ceiling kept":    {Request{Tenant: "batch", Urgency: 5}, 5},
		"above the ceiling capped":  {Request{Tenant: "batch", Urgency: 0}, 4},
		"unknown tenant is default": {Request{Tenant: "nobody", DefaultUrgency: true}, priority.Default},
		"default tenant may ask 0":  {Request{Urgency: 0}, 0},
		"request ceiling (a token)": {Request{Urgency: 1, UrgencyCeiling: 3}, 3},
		"the stricter ceiling wins": {Request{Tenant: "batch", Urgency: 0, UrgencyCeiling: 2}, 4},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			r := tc.req
			st, adm, err := s.Submit(context.Background(), &r)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			if got := st.current().call.(*fakeCall).job.Urgency; got != tc.want || adm.Urgency != tc.want {
				t.Errorf("worker got urgency %d, admission says %d, want %d", got, adm.Urgency, tc.want)
			}
			if !reflect.DeepEqual(r, tc.req) {
				t.Errorf("Submit changed its argument: %+v, was %+v", r, tc.req)
			}
		})
	}
}

func TestSchedulerCancelFromEveryState(t *testing.T) {
	s, clk, w, busy := fakeClockScheduler(t, Config{})
	// Queued, then the client leaves.
	ctx, cancel := context.WithCancel(context.Background())
	queued := submitAsync(t, s, ctx, &Request{Urgency: 2, Deadline: clk.Now().Add(time.Minute)})
	cancel()
	if r := recv(t, queued); !errors.Is(r.err, context.Canceled) {
		t.Errorf("queued: got %v, want context.Canceled", r.err)
	}
	// Queued, then the scheduler closes... covered by TestCloseFailsQueued;
	// here: queued, then the deadline fires in the same instant as a grant.
	racing := submitAsync(t, s, context.Background(), &Request{Deadline: clk.Now().Add(time.Second)})
	busy.Close()
	clk.Advance(time.Second)
	r := recv(t, racing)
	switch {
	case r.err == nil:
		r.st.Close() // the grant won: it runs and is closed (cancelled) while running
		if c := r.st.current().call.(*fakeCall); c.cancelled.Load() != 1 {
			t.Errorf("closing a running stream cancelled it %d times, want 1", c.cancelled.Load())
		}
	case errors.Is(r.err, ErrDeadline):
	default:
		t.Fatalf("got %v, want a stream or ErrDeadline", r.err)
	}
	if st := s.Stats(); st.Queued != 0 || st.Running != 0 {
		t.Errorf("after every request left: %+v, want nothing queued or running", st)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.active != 0 {
		t.Errorf("worker still runs %d requests", w.active)
	}
	waitFor(t, "deadline timers to stop", func() bool { return clk.pending() == 0 })
}

func TestUrgentReserve(t *testing.T) {
	w := newFakeWorker(0, 3)
	s, _ := newTestScheduler(t, Config{UrgentReserve: new(1)}, w)
	var running []*Dispatch
	for range 2 {
		st, _, err := s.Submit(context.Background(), &Request{Urgency: 6})
		if err != nil {
			t.Fatal(err)
		}
		running = append(running, st)
	}
	// The third slot is kept for urgent work: bulk queues...
	bulk := submitAsync(t, s, context.Background(), &Request{Urgency: 6})
	// ...and an urgent request runs at once.
	urgent, _, err := s.Submit(context.Background(), &Request{Urgency: 1})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-bulk:
		t.Fatalf("bulk request took the reserved slot: %v", r.err)
	default:
	}
	urgent.Close() // the reserved slot frees, but bulk may still not use it
	select {
	case r := <-bulk:
		t.Fatalf("bulk request took the reserved slot after the urgent one left: %v", r.err)
	case <-time.After(20 * time.Millisecond):
	}
	running[0].Close()
	r := recv(t, bulk)
	if r.err != nil {
		t.Fatal(r.err)
	}
	r.st.Close()
	running[1].Close()
}
