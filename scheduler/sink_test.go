//go:build linux

package scheduler

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"h3infer/infer"
	"h3infer/transport"
)

// sinkRingWorker is ringWorker that opens its calls into the Dispatch's
// sink, as the worker pool's processes do, and can be taken out of
// service as the pool does with a dying worker.
type sinkRingWorker struct {
	ringWorker
	down atomic.Bool
}

func (w *sinkRingWorker) Ready() bool { return !w.down.Load() }
func (w *sinkRingWorker) OpenSink(id uint64, s *infer.Request, sink *infer.Sink) (infer.Call, error) {
	c, err := w.end.OpenSink(id, s, sink)
	if err != nil {
		return nil, err
	}
	return c, nil
}

var _ SinkBackend = (*sinkRingWorker)(nil)

// silentWorker reads submits and answers none of them, as a worker does
// while a request waits in its batch.
func silentWorker(t *testing.T, we *transport.WorkerEnd, submitted chan<- uint64) {
	for {
		f, err := we.Recv()
		if err != nil {
			if !errors.Is(err, transport.ErrClosed) {
				t.Errorf("worker receive: %v", err)
			}
			return
		}
		if f.Type == transport.FrameSubmit {
			submitted <- f.ID
		}
	}
}

// startRing starts a gateway end over a real segment with work playing
// the worker process; the cleanup ends both.
func startRing(t *testing.T, work func(*transport.WorkerEnd)) *transport.GatewayEnd {
	t.Helper()
	seg, err := transport.NewSegment(0)
	if err != nil {
		t.Fatal(err)
	}
	ge := transport.NewGatewayEnd(seg, transport.GatewayEndConfig{})
	we := transport.NewWorkerEnd(seg)
	var wg sync.WaitGroup
	wg.Go(func() { ge.Run() })
	wg.Go(func() { work(we) })
	t.Cleanup(func() {
		ge.Close()
		wg.Wait()
		seg.Close()
	})
	return ge
}

// TestSinkDispatchStreamsDirect: a request on a SinkBackend gets the
// ring's events on the channel the Dispatch gave its call, and Close ends
// it on the worker.
func TestSinkDispatchStreamsDirect(t *testing.T) {
	cancelled := make(chan uint64, 16)
	ge := startRing(t, func(we *transport.WorkerEnd) { echoWorker(t, we, cancelled) })
	w := &sinkRingWorker{ringWorker: ringWorker{id: 1, slots: 2, end: ge}}
	s, err := New(Config{}, staticSet{w}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)

	st, _, err := s.Submit(context.Background(), &Request{Job: infer.Request{Model: "m", Prompt: "a b c"}})
	if err != nil {
		t.Fatal(err)
	}
	if !st.current().direct {
		t.Fatal("the call on a SinkBackend was not opened into the sink")
	}
	var text []string
	for ev := range st.Events() {
		if ev.Err != nil {
			t.Fatalf("error event %+v", ev.Err)
		}
		if ev.Done != nil {
			break
		}
		text = append(text, ev.Token.Text)
	}
	if got := strings.Join(text, " "); got != "a b c" {
		t.Errorf("got %q, want the prompt echoed", got)
	}
	st.Close()

	held, _, err := s.Submit(context.Background(), &Request{Job: infer.Request{Model: "m", Prompt: "hold"}})
	if err != nil {
		t.Fatal(err)
	}
	if ev := <-held.Events(); ev.Token.Text != "held" {
		t.Fatalf("first event %+v, want the held token", ev)
	}
	held.Close()
	if id := <-cancelled; id != held.ID() {
		t.Errorf("worker cancelled request %d, want %d", id, held.ID())
	}
	if _, ok := <-held.Events(); ok {
		t.Error("events not closed after Close")
	}
	if got := s.Stats().Running; got != 0 {
		t.Errorf("running = %d after both closed, want 0", got)
	}
}

// TestSinkRedispatchAfterWorkerDied: a request whose worker's ring ends
// before the request produced an event moves to the other worker, whose
// call delivers into the channel the consumer already reads; the consumer
// sees only the second worker's answer.
func TestSinkRedispatchAfterWorkerDied(t *testing.T) {
	submitted := make(chan uint64, 4)
	dying := startRing(t, func(we *transport.WorkerEnd) { silentWorker(t, we, submitted) })
	cancelled := make(chan uint64, 16)
	alive := startRing(t, func(we *transport.WorkerEnd) { echoWorker(t, we, cancelled) })
	a := &sinkRingWorker{ringWorker: ringWorker{id: 1, slots: 1, end: dying}}
	b := &sinkRingWorker{ringWorker: ringWorker{id: 2, slots: 1, end: alive}}
	b.down.Store(true) // the request must go to a first
	s, err := New(Config{}, staticSet{a, b}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)

	st, _, err := s.Submit(context.Background(), &Request{Job: infer.Request{Model: "m", Prompt: "x y"}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	first := st.current()
	if first.worker != a || !first.direct {
		t.Fatalf("dispatched to worker %d (direct %v), want worker 1 into the sink", first.worker.ID(), first.direct)
	}
	<-submitted
	// As the pool does: the worker is out of service before its calls fail.
	a.down.Store(true)
	b.down.Store(false)
	dying.Close()

	var text []string
	for ev := range st.Events() {
		if ev.Err != nil {
			t.Fatalf("error event %+v; want the request answered by worker 2", ev.Err)
		}
		if ev.Done != nil {
			break
		}
		text = append(text, ev.Token.Text)
	}
	if got := strings.Join(text, " "); got != "x y" {
		t.Errorf("got %q, want worker 2's echo", got)
	}
	// The new call's events may reach the consumer before the re-dispatch
	// records it as current; Close waits for the re-dispatch to finish.
	st.Close()
	if next := st.current(); next.worker != b {
		t.Errorf("request ended on worker %d, want 2", next.worker.ID())
	}
}

// TestSinkLostWithNowhereToGo: with no other worker, the lost worker's
// error is the answer, delivered on the same channel and followed by its
// close.
func TestSinkLostWithNowhereToGo(t *testing.T) {
	submitted := make(chan uint64, 4)
	dying := startRing(t, func(we *transport.WorkerEnd) { silentWorker(t, we, submitted) })
	a := &sinkRingWorker{ringWorker: ringWorker{id: 1, slots: 1, end: dying}}
	s, err := New(Config{}, staticSet{a}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, _, err := s.Submit(ctx, &Request{Job: infer.Request{Model: "m", Prompt: "x"}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	<-submitted
	a.down.Store(true)
	dying.Close()
	// The re-dispatch queues for a worker that never comes back; the
	// client leaving ends the wait.
	waitFor(t, "the re-dispatch to queue", func() bool { return s.Stats().Queued == 1 })
	cancel()
	ev, ok := recvEvent(t, st)
	if !ok || ev.Err == nil || ev.Err.Code != infer.CodeWorkerLost {
		t.Fatalf("got %+v (open %v), want the worker_lost error", ev, ok)
	}
	if _, ok := recvEvent(t, st); ok {
		t.Error("events not closed after the error")
	}
}
