package scheduler

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"h3infer/config"
	"h3infer/infer"
	"h3infer/priority"
)

func TestServiceRate(t *testing.T) {
	t0 := time.Unix(1_000_000, 0)
	// completions every 100ms for 1s: 10 per second.
	run := func(r *serviceRate, from time.Time, queued bool) time.Time {
		for i := range 11 {
			r.complete(from.Add(time.Duration(i)*100*time.Millisecond), queued)
		}
		return from.Add(time.Second)
	}
	var r serviceRate
	end := run(&r, t0, false)
	if r.perSec != 0 {
		t.Errorf("a window with nothing queued set the rate to %v; it says nothing of capacity", r.perSec)
	}
	r = serviceRate{}
	end = run(&r, t0, true)
	if r.perSec < 9.9 || r.perSec > 10.1 {
		t.Fatalf("saturated window: rate %v, want 10/s", r.perSec)
	}
	// A quiet window (1 completion in 2s) must not lower it.
	r.complete(end.Add(2*time.Second), false)
	if r.perSec < 9.9 {
		t.Errorf("a quiet window lowered the rate to %v", r.perSec)
	}
	// A saturated window at 5/s lowers it; the one opened by the quiet
	// completion does not count.
	start := end.Add(2 * time.Second)
	for i := 1; i <= 10; i++ {
		r.complete(start.Add(time.Duration(i)*200*time.Millisecond), true)
	}
	if r.perSec > 9 {
		t.Errorf("a saturated window at 5/s left the rate at %v", r.perSec)
	}
}

// setRate stands in for a measured service rate of model.
func setRate(s *Scheduler, model string, perSec float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rates[model] = &serviceRate{perSec: perSec}
}

func overload(t *testing.T, err error, reason string) *OverloadError {
	t.Helper()
	var oe *OverloadError
	if !errors.As(err, &oe) || !errors.Is(err, ErrOverloaded) || oe.Reason != reason {
		t.Fatalf("got %v, want an *OverloadError for %s", err, reason)
	}
	return oe
}

func TestPredictionRefusesQueueLongInTime(t *testing.T) {
	s, _, _, busy := fakeClockScheduler(t, Config{MaxQueueDelay: config.Duration(3 * time.Second)})
	setRate(s, "", 1) // one slot freed a second
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var queued []<-chan result
	for range 3 { // waits of 1s, 2s, 3s: admitted
		queued = append(queued, submitAsync(t, s, ctx, &Request{}))
	}
	_, _, err := s.Submit(ctx, &Request{})
	if oe := overload(t, err, ReasonPredictedDelay); oe.RetryAfter != 3*time.Second {
		t.Errorf("Retry-After %s, want 3s: three queued at one a second", oe.RetryAfter)
	}
	setRate(s, "", 0.5)
	_, _, err = s.Submit(ctx, &Request{})
	if oe := overload(t, err, ReasonPredictedDelay); oe.RetryAfter != 6*time.Second {
		t.Errorf("Retry-After %s, want 6s: three queued at one per two seconds", oe.RetryAfter)
	}
	// A model not measured yet is not refused by prediction, however
	// long its queue: only max_queue bounds it.
	for range 3 {
		queued = append(queued, submitAsync(t, s, ctx, &Request{Job: infer.Request{Model: "cold"}}))
	}
	st := s.Stats()
	if st.Refusals[ReasonPredictedDelay] != 2 || st.Refusals[ReasonQueueFull] != 0 {
		t.Errorf("refusals %v, want 2 predicted_delay", st.Refusals)
	}
	if st.Predictions != 5 || st.LastPredictedDelay != 8*time.Second {
		t.Errorf("%d predictions, last %s; want 5, last 8s", st.Predictions, st.LastPredictedDelay)
	}
	// As the queue drains, requests are admitted again.
	busy.Close()
	r := recv(t, queued[0])
	if r.err != nil {
		t.Fatal(r.err)
	}
	setRate(s, "", 1)
	queued = append(queued, submitAsync(t, s, ctx, &Request{}))
	cancel()
	for _, ch := range queued[1:] {
		recv(t, ch)
	}
	r.st.Close()
}

func TestPredictionLetsUrgentPassBulkBacklog(t *testing.T) {
	s, _, _, busy := fakeClockScheduler(t, Config{MaxQueueDelay: config.Duration(2 * time.Second)})
	setRate(s, "", 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var queued []<-chan result
	for range 2 {
		queued = append(queued, submitAsync(t, s, ctx, &Request{Urgency: 7}))
	}
	_, _, err := s.Submit(ctx, &Request{Urgency: 7})
	overload(t, err, ReasonPredictedDelay)
	// Only the requests that would go before it count: none.
	queued = append(queued, submitAsync(t, s, ctx, &Request{Urgency: 0}))
	queued = append(queued, submitAsync(t, s, ctx, &Request{Urgency: 1}))
	busy.Close()
	r := recv(t, queued[2])
	if r.err != nil {
		t.Fatalf("urgent request: %v", r.err)
	}
	r.st.Close()
	cancel()
	for _, ch := range append(queued[:2], queued[3]) {
		if r := recv(t, ch); r.st != nil {
			r.st.Close()
		}
	}
}

func TestCountAdmissionIsMaxQueueAlone(t *testing.T) {
	s, clk, _, busy := fakeClockScheduler(t, Config{
		Admission: AdmissionCount, MaxQueue: 3, MaxQueueDelay: config.Duration(time.Millisecond),
		RetryAfter: config.Duration(7 * time.Second),
	})
	setRate(s, "", 0.01)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var queued []<-chan result
	for range 3 {
		queued = append(queued, submitAsync(t, s, ctx, &Request{}))
	}
	_, _, err := s.Submit(ctx, &Request{})
	if oe := overload(t, err, ReasonQueueFull); oe.RetryAfter != 7*time.Second || oe.Queued != 3 {
		t.Errorf("got %+v, want retry_after 7s, 3 queued", oe)
	}
	clk.Advance(time.Minute)
	s.WorkersChanged()
	clk.Advance(time.Minute)
	s.WorkersChanged()
	if q := s.Stats().Queued; q != 3 {
		t.Errorf("%d queued after two minutes, want 3: count admission has no guard", q)
	}
	if st := s.Stats(); st.Predictions != 0 {
		t.Errorf("%d predictions under count admission", st.Predictions)
	}
	busy.Close()
	r := recv(t, queued[0])
	if r.err != nil {
		t.Fatal(r.err)
	}
	r.st.Close()
	for _, ch := range queued[1:] {
		r := recv(t, ch)
		if r.err != nil {
			t.Fatal(r.err)
		}
		r.st.Close()
	}
}

func TestGuardFailsStaleWaitersAfterInterval(t *testing.T) {
	s, clk, _, busy := fakeClockScheduler(t, Config{
		QueueDelayTarget: config.Duration(time.Second), QueueDelayInterval: config.Duration(500 * time.Millisecond),
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stale := submitAsync(t, s, ctx, &Request{Urgency: 5})
	urgent := submitAsync(t, s, ctx, &Request{Urgency: 0})
	clk.Advance(1200 * time.Millisecond) // over the target from here on
	s.WorkersChanged()
	fresh := submitAsync(t, s, ctx, &Request{Urgency: 5})
	clk.Advance(400 * time.Millisecond) // over it for less than the interval
	s.WorkersChanged()
	if q := s.Stats().Queued; q != 3 {
		t.Fatalf("%d queued before the interval passed, want 3", q)
	}
	clk.Advance(200 * time.Millisecond)
	s.WorkersChanged()
	r := recv(t, stale)
	if oe := overload(t, r.err, ReasonQueueDelay); oe.RetryAfter < time.Second {
		t.Errorf("Retry-After %s, want at least 1s", oe.RetryAfter)
	}
	if q := s.Stats().Queued; q != 2 {
		t.Errorf("%d queued, want 2: the urgent one and the one that waited under the target", q)
	}
	// While the queue stands over the target, a request that passes it
	// fails at once.
	clk.Advance(500 * time.Millisecond) // fresh has waited 1.1s
	s.WorkersChanged()
	overload(t, recv(t, fresh).err, ReasonQueueDelay)
	if n := s.Stats().Refusals[ReasonQueueDelay]; n != 2 {
		t.Errorf("%d queue_delay refusals, want 2", n)
	}
	busy.Close()
	r = recv(t, urgent)
	if r.err != nil {
		t.Fatalf("urgent request: %v", r.err)
	}
	r.st.Close()
}

// TestOverloadBurstKeepsQueueShortInTime is the user's view of delay
// admission: under a burst several times the backends' capacity, in real
// time, no admitted request waits much past max_queue_delay, and the
// refused ones are told when to come back.
func TestOverloadBurstKeepsQueueShortInTime(t *testing.T) {
	const (
		service  = 100 * time.Millisecond
		maxDelay = time.Second
		slack    = time.Second
		arrivals = 120 // per second: three times the 4 slots' 40 a second
		burst    = 2 * time.Second
	)
	s, _ := newTestScheduler(t, Config{MaxQueueDelay: config.Duration(maxDelay)}, newFakeWorker(0, 2), newFakeWorker(1, 2))
	var (
		mu       sync.Mutex
		waits    []time.Duration
		refused  []*OverloadError
		other    []error
		requests sync.WaitGroup
	)
	tick := time.NewTicker(time.Second / arrivals)
	defer tick.Stop()
	for end := time.Now().Add(burst); time.Now().Before(end); <-tick.C {
		requests.Go(func() {
			start := time.Now()
			d, _, err := s.Submit(context.Background(), &Request{Urgency: priority.Default})
			wait := time.Since(start)
			var oe *OverloadError
			mu.Lock()
			switch {
			case err == nil:
				waits = append(waits, wait)
			case errors.As(err, &oe):
				refused = append(refused, oe)
			default:
				other = append(other, err)
			}
			mu.Unlock()
			if d != nil {
				time.Sleep(service) // the backend at work
				d.Close()
			}
		})
	}
	requests.Wait()
	if len(other) > 0 {
		t.Fatalf("%d requests failed otherwise, first: %v", len(other), other[0])
	}
	bound := maxDelay + service + slack
	var longest time.Duration
	for _, w := range waits {
		longest = max(longest, w)
	}
	if longest > bound {
		t.Errorf("an admitted request waited %s, want at most %s", longest, bound)
	}
	byReason := map[string]int{}
	for _, oe := range refused {
		byReason[oe.Reason]++
		if oe.RetryAfter <= 0 {
			t.Errorf("refused without Retry-After: %+v", oe)
		}
	}
	if byReason[ReasonPredictedDelay] == 0 {
		t.Errorf("no request refused by prediction (refusals %v)", byReason)
	}
	if len(waits) == 0 {
		t.Error("no request admitted")
	}
	t.Logf("%d admitted, longest wait %s; refused %v", len(waits), longest, byReason)
}

func TestLIFOWhileGuardFails(t *testing.T) {
	s, clk, _, busy := fakeClockScheduler(t, Config{
		LIFO:             true,
		QueueDelayTarget: config.Duration(time.Second), QueueDelayInterval: config.Duration(500 * time.Millisecond),
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stale := submitAsync(t, s, ctx, &Request{Urgency: 5})
	clk.Advance(1200 * time.Millisecond)
	s.WorkersChanged()
	clk.Advance(600 * time.Millisecond)
	s.WorkersChanged()
	overload(t, recv(t, stale).err, ReasonQueueDelay)
	older := submitAsync(t, s, ctx, &Request{Urgency: 5})
	clk.Advance(100 * time.Millisecond)
	newer := submitAsync(t, s, ctx, &Request{Urgency: 5})
	busy.Close()
	r := recv(t, newer)
	if r.err != nil {
		t.Fatalf("newer request: %v", r.err)
	}
	select {
	case <-older:
		t.Fatal("the older request went first while the guard was failing requests")
	default:
	}
	r.st.Close()
	if r := recv(t, older); r.err != nil {
		t.Fatal(r.err)
	} else {
		r.st.Close()
	}
}
