package engine

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/priority"
	"h3infer/transport"
	"h3infer/workerconf"
)

// threadNice is the nice value of the calling thread. The raw syscall
// returns 20 - nice.
func threadNice(t *testing.T) int {
	t.Helper()
	v, err := syscall.Getpriority(syscall.PRIO_PROCESS, syscall.Gettid())
	if err != nil {
		t.Fatal(err)
	}
	return 20 - v
}

// The bulk lane's thread runs at the nice value asked for; the thread
// that started it, and threads started afterwards, keep theirs.
func TestLaneNiceIsItsOwn(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	base := threadNice(t)
	if base+3 > workerconf.MaxNice {
		t.Fatalf("test process already runs at nice %d", base)
	}
	l, err := newLane(base + 3)
	if err != nil {
		t.Fatal(err)
	}
	defer l.close()
	var onLane int
	l.run(func() { onLane = threadNice(t) })
	if onLane != base+3 {
		t.Errorf("lane thread nice %d, want %d", onLane, base+3)
	}
	if got := threadNice(t); got != base {
		t.Errorf("starting thread nice %d after the lane started, want %d", got, base)
	}
	later := make(chan int)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		later <- threadNice(t)
	}()
	if got := <-later; got != base {
		t.Errorf("a later thread has nice %d, want %d", got, base)
	}
}

// gatedLane is a lane whose thread calls before, when set, ahead of each
// function: the test acts while the loop waits for a bulk step.
func gatedLane(t *testing.T) (*lane, func(func())) {
	l := &lane{work: make(chan func()), done: make(chan struct{})}
	var mu sync.Mutex
	var before func()
	go func() {
		defer close(l.done)
		for f := range l.work {
			mu.Lock()
			b := before
			before = nil
			mu.Unlock()
			if b != nil {
				b()
			}
			f()
			l.done <- struct{}{}
		}
	}()
	t.Cleanup(l.close)
	return l, func(f func()) {
		mu.Lock()
		before = f
		mu.Unlock()
	}
}

// An urgent request that arrives while a bulk step runs on the bulk lane
// is prefilled and sends its first token before that step ends; a cancel
// that arrives meanwhile still stops its sequence before the step's token
// goes out; and every sequence makes the tokens it makes alone.
func TestUrgentFirstTokenBesideBulkStep(t *testing.T) {
	m := loadTestModel(t)
	subs := batchSubmits()[:4]
	for i := range subs {
		subs[i].Urgency, subs[i].Class = 6, priority.Bulk
	}
	urgent := infer.Request{Model: "demo", Prompt: "An urgent ", MaxTokens: 20, Urgency: 0, Class: priority.Urgent}
	const urgentID, cancelID = 100, 1
	w, rec, inbox := testLoop(t, 8, workerconf.DefaultKVCacheBytes)
	var gate func(func())
	w.bulk, gate = gatedLane(t)
	// Every bulk step goes aside, however short it has been.
	w.asideMin, w.inlineMax = 0, 0

	for i := range subs {
		inbox <- submit(uint64(i), subs[i])
	}
	for range 3 {
		if err := w.round(inbox); err != nil {
			t.Fatal(err)
		}
	}
	if len(w.batches[0].rows) != len(subs) {
		t.Fatalf("batch holds %d rows, want %d", len(w.batches[0].rows), len(subs))
	}
	tokensOf := func(id uint64) int {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return rec.tokens[id]
	}
	var cancelledAt int
	sawFirst := false
	gate(func() {
		cancelledAt = tokensOf(cancelID)
		inbox <- inbound{typ: transport.FrameCancel, id: cancelID}
		inbox <- submit(urgentID, urgent)
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			if tokensOf(urgentID) > 0 {
				sawFirst = true
				return
			}
			time.Sleep(time.Millisecond)
		}
	})
	if err := w.round(inbox); err != nil {
		t.Fatal(err)
	}
	if !sawFirst {
		t.Fatal("the urgent request sent no token while the bulk step ran")
	}
	if got := tokensOf(cancelID); got != cancelledAt {
		t.Errorf("cancelled request sent %d tokens after its cancel arrived mid-step", got-cancelledAt)
	}
	if !w.carriesUrgent(w.batches[0]) {
		t.Error("the urgent request did not join the batch after the step")
	}
	runUntilIdle(t, w, inbox, 1000)

	check := func(id uint64, s infer.Request) {
		t.Helper()
		wantText, wantDone, err := Generate(context.Background(), m, &s)
		if err != nil {
			t.Fatal(err)
		}
		if e, ok := rec.errs[id]; ok {
			t.Fatalf("request %d: error %+v", id, e)
		}
		if got := rec.textOf(id); got != wantText || rec.done[id] != wantDone {
			t.Errorf("request %d:\nbeside the bulk lane %q %+v\nalone %q %+v", id, got, rec.done[id], wantText, wantDone)
		}
	}
	for i, s := range subs {
		if i != cancelID {
			check(uint64(i), s)
		}
	}
	check(urgentID, urgent)
	if _, ok := rec.done[cancelID]; ok {
		t.Error("the cancelled request finished")
	}
}

// countingLane is a bulk lane whose hand-off takes at least delay, as a
// slow thread wake-up would, and which counts the work it runs.
func countingLane(t *testing.T, delay time.Duration) (*lane, *atomic.Int64) {
	l := &lane{work: make(chan func()), done: make(chan struct{})}
	var ran atomic.Int64
	go func() {
		defer close(l.done)
		for f := range l.work {
			time.Sleep(delay)
			f()
			ran.Add(1)
			l.done <- struct{}{}
		}
	}()
	t.Cleanup(l.close)
	return l, &ran
}

// Bulk work much shorter than the lane's measured hand-off stays on the
// loop's thread once the hand-off is known, unless it takes inlineMax or
// longer: an urgent request never waits behind more than that.
func TestShortBulkWorkStaysOffASlowLane(t *testing.T) {
	for _, tc := range []struct {
		name      string
		inlineMax time.Duration
		wantAside func(aside, steps int64) bool
		want      string
	}{
		// A hand-off of 50 ms puts four of them far above any step of
		// the test model: after the first prefill and step have gone
		// aside and measured it, nothing else does.
		{"hand-off dominates", time.Minute, func(aside, steps int64) bool { return aside <= 2 }, "at most the first prefill and step"},
		// The same hand-off, but nothing over a microsecond may stay on
		// the loop's thread: every step and prefill goes aside.
		{"capped", time.Microsecond, func(aside, steps int64) bool { return aside == steps }, "every prefill and step"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Short prompts: a prefill's estimate is per prompt token,
			// measured on the first, and a long prompt would be a long
			// piece of work.
			all := batchSubmits()
			subs := []infer.Request{all[0], all[2]}
			for i := range subs {
				subs[i].Urgency, subs[i].Class, subs[i].MaxTokens = 6, priority.Bulk, 8
			}
			w, rec, inbox := testLoop(t, 8, workerconf.DefaultKVCacheBytes)
			var ran *atomic.Int64
			w.bulk, ran = countingLane(t, 50*time.Millisecond)
			w.inlineMax = tc.inlineMax
			for i := range subs {
				inbox <- submit(uint64(i), subs[i])
			}
			var rounds int64
			for len(w.byID) > 0 || len(inbox) > 0 {
				if rounds++; rounds > 100 {
					t.Fatal("requests did not finish in 100 rounds")
				}
				if err := w.round(inbox); err != nil {
					t.Fatal(err)
				}
			}
			// Each round steps the one batch, or prefills; two prompts.
			work := rounds + int64(len(subs))
			for i := range subs {
				if _, ok := rec.done[uint64(i)]; !ok {
					t.Errorf("request %d did not finish", i)
				}
			}
			if got := ran.Load(); !tc.wantAside(got, work) {
				t.Errorf("%d of about %d prefills and steps went aside; want %s (hand-off measured %v)", got, work, tc.want, w.handoff.avg)
			}
		})
	}
}

// slowSteps is a model whose decode steps and prefills take at least step
// and prefill longer, as a larger model's would. It spins: a sleep's
// wake-up is late by more than a step on a loaded machine.
type slowSteps struct {
	Model
	step, prefill time.Duration
}

func spin(d time.Duration) {
	for end := time.Now().Add(d); time.Now().Before(end); {
	}
}

func (m slowSteps) Step(next []int) ([]float32, error) {
	spin(m.step)
	return m.Model.Step(next)
}

func (m slowSteps) Prefill(ids []int) ([]float32, [][]byte, error) {
	spin(m.prefill)
	return m.Model.Prefill(ids)
}

// An urgent request prefilled on the loop's thread while a bulk step runs
// aside is the loop's work, not the hand-off's: it must not count as
// hand-off, or after it bulk steps several hand-offs long would stay on
// the loop's thread for good, where urgent requests wait behind them.
func TestUrgentWorkBesideAStepIsNotHandOff(t *testing.T) {
	w, rec, inbox := testLoopOf(t, 8, workerconf.DefaultKVCacheBytes, slowSteps{loadTestModel(t), 400 * time.Microsecond, 3 * time.Millisecond})
	var gate func(func())
	w.bulk, gate = gatedLane(t)
	bulk := infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 60, Urgency: 6, Class: priority.Bulk}
	urgent := infer.Request{Model: "demo", Prompt: "An urgent ", MaxTokens: 1, Urgency: 0, Class: priority.Urgent}
	inbox <- submit(1, bulk)
	// The bulk prefill and the first step go aside, not yet measured;
	// as each of the first five steps starts an urgent request arrives,
	// and the loop prefills it while the step runs, for longer than the
	// step.
	var asides atomic.Int64
	var hook func()
	hook = func() {
		if n := asides.Add(1); n >= 2 && n <= 6 {
			inbox <- submit(uint64(n), urgent)
		}
		gate(hook)
	}
	gate(hook)
	runUntilIdle(t, w, inbox, 200)
	if _, ok := rec.done[1]; !ok {
		t.Fatal("the bulk request did not finish")
	}
	// The lane's hand-off is two goroutine wake-ups, far under a step of
	// 400 µs / 4: the steps keep going aside.
	if got := asides.Load(); got < 30 {
		t.Errorf("%d prefills and steps of 60 went aside; hand-off measured %v", got, w.handoff.avg)
	}
}

// varSteps is a model whose decode steps take at least what step holds
// longer, changed while it runs.
type varSteps struct {
	Model
	step *atomic.Int64 // nanoseconds
}

func (m varSteps) Step(next []int) ([]float32, error) {
	spin(time.Duration(m.step.Load()))
	return m.Model.Step(next)
}

// A hand-off estimate taken while the machine was slow comes back down:
// work it keeps on the loop's thread still goes aside now and then, and
// measures it again.
func TestHandOffEstimateComesBackDown(t *testing.T) {
	w, rec, inbox := testLoop(t, 8, workerconf.DefaultKVCacheBytes)
	var ran *atomic.Int64
	w.bulk, ran = countingLane(t, 0)
	req := infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 100, IgnoreEOS: true, Urgency: 6, Class: priority.Bulk}
	// A first request measures the model's prefill and step.
	inbox <- submit(1, req)
	runUntilIdle(t, w, inbox, 1000)
	// Then a slow moment: the estimate at its cap, which keeps the
	// model's work on the loop's thread.
	w.handoff = handoffCost{avg: inlineMax, known: true}
	before := ran.Load()
	inbox <- submit(2, req)
	runUntilIdle(t, w, inbox, 1000)
	for id := range uint64(2) {
		if _, ok := rec.done[id+1]; !ok {
			t.Fatalf("request %d did not finish", id+1)
		}
	}
	if aside := ran.Load() - before; aside == 0 || w.handoff.avg >= inlineMax*15/16 {
		t.Errorf("%d prefills and steps went aside, hand-off estimate %v: it stayed where a slow moment left it", aside, w.handoff.avg)
	}
}

// A batch whose steps grow past what may stay on the loop's thread goes
// aside from its next step on, not after the estimate has crept up.
func TestGrownStepGoesAsideAtOnce(t *testing.T) {
	var step atomic.Int64
	step.Store(int64(100 * time.Microsecond))
	w, rec, inbox := testLoopOf(t, 8, workerconf.DefaultKVCacheBytes, varSteps{loadTestModel(t), &step})
	var ran *atomic.Int64
	w.bulk, ran = countingLane(t, 200*time.Microsecond)
	w.inlineMax = time.Minute
	// Four hand-offs: 800 µs, far above the short steps, far below the
	// long ones.
	w.handoff = handoffCost{avg: 200 * time.Microsecond, known: true}
	inbox <- submit(1, infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 60, IgnoreEOS: true, Urgency: 6, Class: priority.Bulk})
	for range 20 {
		if err := w.round(inbox); err != nil {
			t.Fatal(err)
		}
	}
	before := ran.Load()
	step.Store(int64(5 * time.Millisecond))
	const long = 10
	for range long {
		if err := w.round(inbox); err != nil {
			t.Fatal(err)
		}
	}
	// The first long step runs where the short ones did; the rest go
	// aside.
	if got := ran.Load() - before; got < long-1 {
		t.Errorf("%d of %d long steps went aside, want %d", got, long, long-1)
	}
	runUntilIdle(t, w, inbox, 1000)
	if _, ok := rec.done[1]; !ok {
		t.Fatal("the request did not finish")
	}
}

// A worker that has just served an urgent request hands bulk work to the
// lane however short it is against the hand-off: the next urgent request
// should not wait behind it.
func TestBulkWorkGoesAsideNearUrgentTraffic(t *testing.T) {
	w, rec, inbox := testLoop(t, 8, workerconf.DefaultKVCacheBytes)
	var ran *atomic.Int64
	w.bulk, ran = countingLane(t, 0)
	w.inlineMax = time.Minute
	w.handoff = handoffCost{avg: time.Second, known: true}
	inbox <- submit(1, infer.Request{Model: "demo", Prompt: "An urgent ", MaxTokens: 4, Urgency: 0, Class: priority.Urgent})
	runUntilIdle(t, w, inbox, 100)
	bulk := infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 20, IgnoreEOS: true, Urgency: 6, Class: priority.Bulk}
	inbox <- submit(2, bulk)
	var rounds int64
	for len(w.byID) > 0 || len(inbox) > 0 {
		if rounds++; rounds > 100 {
			t.Fatal("the bulk request did not finish in 100 rounds")
		}
		if err := w.round(inbox); err != nil {
			t.Fatal(err)
		}
	}
	for id := range uint64(2) {
		if _, ok := rec.done[id+1]; !ok {
			t.Fatalf("request %d did not finish", id+1)
		}
	}
	// Its prefill and every step: one per round.
	if got := ran.Load(); got < rounds {
		t.Errorf("%d of the bulk request's %d prefills and steps went aside, want all", got, rounds)
	}
}
