package scheduler

import (
	"context"
	"testing"
	"time"

	"h3infer/infer"
)

func lostEvent() infer.Event {
	return infer.Event{Err: &infer.Error{Code: infer.CodeWorkerLost, Message: "worker exited"}}
}

// recvEvent reads one event from st or fails after a generous bound.
func recvEvent(t *testing.T, st *Dispatch) (infer.Event, bool) {
	t.Helper()
	select {
	case ev, ok := <-st.Events():
		return ev, ok
	case <-time.After(5 * time.Second):
		t.Fatal("no event within 5s")
		return infer.Event{}, false
	}
}

// TestRedispatchBeforeStart: a request whose worker dies before it sent
// anything runs on another worker, and the consumer sees only the new
// worker's answer.
func TestRedispatchBeforeStart(t *testing.T) {
	a, b := newFakeWorker(1, 1), newFakeWorker(2, 1)
	s, _ := newTestScheduler(t, Config{}, a, b)
	st, _, err := s.Submit(context.Background(), &Request{Job: infer.Request{Model: "m", Prompt: "p"}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	first := st.current()
	if first.worker != a {
		t.Fatalf("dispatched to worker %d, want 1", first.worker.ID())
	}
	a.ready.Store(false) // as the pool does before the dead worker's calls fail
	first.call.(*fakeCall).events <- lostEvent()
	waitFor(t, "the re-dispatch", func() bool { return st.current() != first })
	next := st.current()
	if next.worker != b || next.call.(*fakeCall).job.Prompt != "p" {
		t.Fatalf("re-dispatched to worker %d with job %+v, want worker 2 with the same job", next.worker.ID(), next.call.(*fakeCall).job)
	}
	go func() {
		c := next.call.(*fakeCall)
		c.events <- infer.Event{Token: infer.Token{Count: 1, Text: "hi"}}
		c.events <- infer.Event{Done: &infer.Done{FinishReason: infer.FinishStop}}
		close(c.events)
	}()
	if ev, _ := recvEvent(t, st); ev.Token.Text != "hi" {
		t.Errorf("first event %+v, want the token from worker 2", ev)
	}
	if ev, _ := recvEvent(t, st); ev.Done == nil {
		t.Errorf("second event %+v, want done", ev)
	}
	if _, ok := recvEvent(t, st); ok {
		t.Error("events not closed after done")
	}
	// The dead worker's slot was given back.
	if got := s.Stats().Running; got != 1 {
		t.Errorf("running = %d, want 1", got)
	}
}

// TestLostAfterStartIsAnError: once a token went out, a dying worker ends
// the stream with an explicit worker_lost error, never a silent end.
func TestLostAfterStartIsAnError(t *testing.T) {
	a, b := newFakeWorker(1, 1), newFakeWorker(2, 1)
	s, _ := newTestScheduler(t, Config{}, a, b)
	st, _, err := s.Submit(context.Background(), &Request{Job: infer.Request{Model: "m"}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c := st.current().call.(*fakeCall)
	go func() {
		c.events <- infer.Event{Token: infer.Token{Count: 1, Text: "par"}}
		c.events <- lostEvent()
		close(c.events)
	}()
	if ev, _ := recvEvent(t, st); ev.Token.Text != "par" {
		t.Fatalf("got %+v, want the token", ev)
	}
	if ev, _ := recvEvent(t, st); ev.Err == nil || ev.Err.Code != infer.CodeWorkerLost {
		t.Errorf("got %+v, want the worker_lost error", ev)
	}
	if len(b.openedIDs()) != 0 {
		t.Errorf("a started request was re-dispatched to worker 2")
	}
}

// TestRedispatchBounded: a request that keeps losing its worker gives up
// after maxRedispatch moves and reports the loss.
func TestRedispatchBounded(t *testing.T) {
	a := newFakeWorker(1, 1)
	s, _ := newTestScheduler(t, Config{}, a)
	st, _, err := s.Submit(context.Background(), &Request{Job: infer.Request{Model: "m"}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// The worker comes back at once each time, as a fast restart would.
	for i := range maxRedispatch + 1 {
		cur := st.current()
		cur.call.(*fakeCall).events <- lostEvent()
		if i < maxRedispatch {
			waitFor(t, "the re-dispatch", func() bool { return st.current() != cur })
		}
	}
	if ev, _ := recvEvent(t, st); ev.Err == nil || ev.Err.Code != infer.CodeWorkerLost {
		t.Errorf("got %+v, want worker_lost after %d moves", ev, maxRedispatch)
	}
	if n := len(a.openedIDs()); n != maxRedispatch+1 {
		t.Errorf("opened %d times, want %d", n, maxRedispatch+1)
	}
}

// TestStreamEndsOnCloseNotContext: the request's context ending does not
// close the stream under its consumer, which would read as a stream that
// ended without a result; the consumer decides what its context means, and
// Close ends the forwarding.
func TestStreamEndsOnCloseNotContext(t *testing.T) {
	a := newFakeWorker(1, 1)
	s, _ := newTestScheduler(t, Config{}, a)
	ctx, cancel := context.WithCancel(context.Background())
	st, _, err := s.Submit(ctx, &Request{Job: infer.Request{Model: "m"}})
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	c := st.current().call.(*fakeCall)
	c.events <- infer.Event{Token: infer.Token{Count: 1, Text: "late"}}
	if ev, ok := recvEvent(t, st); !ok || ev.Token.Text != "late" {
		t.Errorf("got %+v (open %v), want the token sent after the context ended", ev, ok)
	}
	st.Close()
	if _, ok := recvEvent(t, st); ok {
		t.Error("events not closed after Close")
	}
	if got := s.Stats().Running; got != 0 {
		t.Errorf("running = %d after Close, want 0", got)
	}
}

func refusedEvent() infer.Event {
	return infer.Event{Err: &infer.Error{Code: infer.CodeOverloaded, Message: "upstream said 503", Unstarted: true}}
}

// TestRefusalMovesOnceElsewhere: a backend that refuses a request before
// it began (an upstream's 503) stays ready, yet the request moves to
// another backend of its model, and a second refusal is the answer: the
// request never returns to a backend that refused it.
func TestRefusalMovesOnceElsewhere(t *testing.T) {
	a, b, c := newFakeWorker(1, 1), newFakeWorker(2, 1), newFakeWorker(3, 1)
	s, _ := newTestScheduler(t, Config{}, a, b, c)
	st, _, err := s.Submit(context.Background(), &Request{Job: infer.Request{Model: "m", Prompt: "p"}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	first := st.current()
	first.call.(*fakeCall).events <- refusedEvent()
	waitFor(t, "the retry", func() bool { return st.current() != first })
	second := st.current()
	if second.worker == first.worker {
		t.Fatalf("retried on the backend that refused it (%d)", first.worker.ID())
	}
	second.call.(*fakeCall).events <- refusedEvent()
	ev, _ := recvEvent(t, st)
	if ev.Err == nil || ev.Err.Code != infer.CodeOverloaded {
		t.Fatalf("after two refusals got %+v, want the second refusal", ev)
	}
	if got := len(a.openedIDs()) + len(b.openedIDs()) + len(c.openedIDs()); got != 2 {
		t.Errorf("opened %d calls, want 2: one retry only", got)
	}
}

// TestRefusalWithNoOtherBackendIsTheAnswer: with no other backend for the
// model the refusal goes straight to the client, without waiting in the
// queue for a slot that could never come.
func TestRefusalWithNoOtherBackendIsTheAnswer(t *testing.T) {
	a := newFakeWorker(1, 2)
	other := newFakeWorker(2, 2)
	other.models = []string{"other"}
	s, _ := newTestScheduler(t, Config{}, a, other)
	st, _, err := s.Submit(context.Background(), &Request{Job: infer.Request{Model: "m"}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.current().call.(*fakeCall).events <- refusedEvent()
	if ev, _ := recvEvent(t, st); ev.Err == nil || ev.Err.Code != infer.CodeOverloaded {
		t.Fatalf("got %+v, want the refusal", ev)
	}
	if n := len(other.openedIDs()); n != 0 {
		t.Errorf("a backend of another model got %d calls", n)
	}
}

// TestDispatchByModel: a request goes only to a backend of its model, and
// a model whose backends are full does not hold up a queued request for a
// model with a free slot, even one queued behind it at a less urgent
// level.
func TestDispatchByModel(t *testing.T) {
	big, small := newFakeWorker(1, 1), newFakeWorker(2, 1)
	big.models, small.models = []string{"big"}, []string{"small"}
	s, _ := newTestScheduler(t, Config{}, big, small)
	ctx := context.Background()
	holdBig, _, err := s.Submit(ctx, &Request{Job: infer.Request{Model: "big"}})
	if err != nil {
		t.Fatal(err)
	}
	if holdBig.current().worker != big {
		t.Fatalf("model big went to backend %d", holdBig.current().worker.ID())
	}
	holdSmall, _, err := s.Submit(ctx, &Request{Job: infer.Request{Model: "small"}})
	if err != nil {
		t.Fatal(err)
	}
	queuedBig := submitAsync(t, s, ctx, &Request{Urgency: 0, Job: infer.Request{Model: "big"}})
	queuedSmall := submitAsync(t, s, ctx, &Request{Urgency: 7, Job: infer.Request{Model: "small"}})
	holdSmall.Close()
	r := recv(t, queuedSmall)
	if r.err != nil || r.st.current().worker != small {
		t.Fatalf("queued small request: %v, want it on the freed small backend", r.err)
	}
	r.st.Close()
	select {
	case r := <-queuedBig:
		t.Fatalf("the big request left the queue (%v) while its backend was full", r.err)
	default:
	}
	holdBig.Close()
	if r := recv(t, queuedBig); r.err != nil || r.st.current().worker != big {
		t.Fatalf("queued big request: %v", r.err)
	} else {
		r.st.Close()
	}
}
