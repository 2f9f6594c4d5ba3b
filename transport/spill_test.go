//go:build linux

package transport

import (
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"h3infer/infer"
)

// spillHarness is a GatewayEnd whose worker end is driven by the test in
// the same process, so that it decides when each frame goes out.
type spillHarness struct {
	g *GatewayEnd
	w *WorkerEnd
}

func startSpill(t *testing.T, callBuffer int) *spillHarness {
	t.Helper()
	checkGoroutines(t)
	gwSeg, wkSeg := newPair(t, 64<<10)
	h := &spillHarness{g: NewGatewayEnd(gwSeg, GatewayEndConfig{CallBuffer: callBuffer}), w: NewWorkerEnd(wkSeg)}
	runErr := make(chan error, 1)
	go func() { runErr <- h.g.Run() }()
	t.Cleanup(func() {
		h.g.Close()
		if err := <-runErr; err != nil && !errors.Is(err, ErrClosed) {
			t.Error(err)
		}
	})
	return h
}

// open opens a call into sink (nil for the call's own channel) and takes
// its submit off the request ring.
func (h *spillHarness) open(t *testing.T, id uint64, sink *infer.Sink) *Call {
	t.Helper()
	c, err := h.g.OpenSink(id, &infer.Request{Model: "m", Prompt: "p"}, sink)
	if err != nil {
		t.Fatal(err)
	}
	if f, err := h.w.Recv(); err != nil || f.Type != FrameSubmit || f.ID != id {
		t.Fatalf("got frame %v %d, %v, want the submit of %d", f.Type, f.ID, err, id)
	}
	return c
}

// tokens sends tokens from, from+1, …, to-1 for id, each one token whose
// text is its number.
func (h *spillHarness) tokens(t *testing.T, id uint64, from, to int) {
	t.Helper()
	for i := from; i < to; i++ {
		if err := h.w.SendToken(id, infer.Token{Count: 1, Text: strconv.Itoa(i)}); err != nil {
			t.Fatal(err)
		}
	}
}

// waitUnread waits until the receive loop has given c n unread events.
func waitUnread(t *testing.T, c *Call, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.mu.Lock()
		got := c.unread()
		c.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("call holds %d unread events, want %d", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// readAll reads c's events until the channel closes and checks that the
// tokens count up from 0; it returns how many tokens came and the event
// after them, if any.
func readAll(t *testing.T, c *Call) (tokens int, last *infer.Event) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-c.Events():
			switch {
			case !ok:
				return tokens, last
			case last != nil:
				t.Fatalf("event %+v after the terminal %+v", ev, *last)
			case ev.Done != nil || ev.Err != nil:
				last = &ev
			case ev.Token.Text != strconv.Itoa(tokens):
				t.Fatalf("token %d is %q: out of order", tokens, ev.Token.Text)
			default:
				tokens++
			}
		case <-timeout:
			t.Fatalf("events not closed after %d tokens", tokens)
		}
	}
}

// TestCallSpill: a consumer that falls behind by more than its call's
// channel holds gets every event, in order, up to CallBuffer unread; one
// more overflows the call as before; and Cancel ends a call whose events
// wait in the queue. checkGoroutines shows the goroutine that holds them
// gone afterwards.
func TestCallSpill(t *testing.T) {
	const bound = 100
	t.Run("behind by the bound", func(t *testing.T) {
		h := startSpill(t, bound)
		c := h.open(t, 1, nil)
		h.tokens(t, 1, 0, bound)
		if err := h.w.SendDone(1, infer.Done{FinishReason: infer.FinishStop, CompletionTokens: bound}); err != nil {
			t.Fatal(err)
		}
		waitUnread(t, c, bound+1)
		if cap(c.events) != callChannel {
			t.Errorf("the call's channel holds %d events, want %d", cap(c.events), callChannel)
		}
		n, last := readAll(t, c)
		if n != bound || last == nil || last.Done == nil {
			t.Errorf("got %d tokens and %+v, want %d and the done", n, last, bound)
		}
	})
	t.Run("overflow", func(t *testing.T) {
		h := startSpill(t, bound)
		c := h.open(t, 1, nil)
		h.tokens(t, 1, 0, bound+5)
		if f, err := h.w.Recv(); err != nil || f.Type != FrameCancel || f.ID != 1 {
			t.Fatalf("got frame %v %d, %v, want the overflow's cancel", f.Type, f.ID, err)
		}
		n, last := readAll(t, c)
		if n != bound || last == nil || last.Err == nil || last.Err.Code != infer.CodeOverflow {
			t.Errorf("got %d tokens and %+v, want %d and an overflow error", n, last, bound)
		}
	})
	t.Run("cancel while spilled", func(t *testing.T) {
		h := startSpill(t, bound)
		c := h.open(t, 1, nil)
		h.tokens(t, 1, 0, 50)
		waitUnread(t, c, 50)
		c.Cancel()
		c.Cancel()
		n, last := readAll(t, c)
		if last != nil || n < callChannel || n > callChannel+1 {
			t.Errorf("got %d tokens and %+v after Cancel, want the %d the channel held (one more if it was being sent) and no terminal event", n, last, callChannel)
		}
		if f, err := h.w.Recv(); err != nil || f.Type != FrameCancel || f.ID != 1 {
			t.Fatalf("got frame %v %d, %v, want the cancel", f.Type, f.ID, err)
		}
	})
	t.Run("cancel after done while spilled", func(t *testing.T) {
		h := startSpill(t, bound)
		c := h.open(t, 1, nil)
		h.tokens(t, 1, 0, 30)
		if err := h.w.SendDone(1, infer.Done{FinishReason: infer.FinishStop}); err != nil {
			t.Fatal(err)
		}
		waitUnread(t, c, 31)
		// The consumer leaves without reading: Cancel releases the
		// goroutine holding the rest.
		c.Cancel()
		if n, _ := readAll(t, c); n > callChannel+1 {
			t.Errorf("got %d tokens after Cancel, want at most %d", n, callChannel+1)
		}
	})
	t.Run("behind, caught up, behind again", func(t *testing.T) {
		h := startSpill(t, 1<<20)
		c := h.open(t, 1, nil)
		const total = 5000
		sent := make(chan error, 1)
		go func() {
			for i := range total {
				if err := h.w.SendToken(1, infer.Token{Count: 1, Text: strconv.Itoa(i)}); err != nil {
					sent <- err
					return
				}
				if i%500 == 0 {
					time.Sleep(2 * time.Millisecond) // the consumer catches up
				}
			}
			sent <- h.w.SendDone(1, infer.Done{FinishReason: infer.FinishStop})
		}()
		got := 0
		for ev := range c.Events() {
			if ev.Done != nil {
				continue
			}
			if ev.Token.Text != strconv.Itoa(got) {
				t.Fatalf("token %d is %q: out of order", got, ev.Token.Text)
			}
			got++
			if got%700 == 0 {
				time.Sleep(3 * time.Millisecond) // the consumer falls behind
			}
		}
		if err := <-sent; err != nil {
			t.Fatal(err)
		}
		if got != total {
			t.Errorf("got %d tokens, want %d", got, total)
		}
	})
	t.Run("sink channel", func(t *testing.T) {
		// An opener's channel smaller than the bound no longer lowers it.
		h := startSpill(t, bound)
		sink := &infer.Sink{Events: make(chan infer.Event, 2)}
		c := h.open(t, 1, sink)
		h.tokens(t, 1, 0, bound)
		if err := h.w.SendError(1, infer.Error{Code: infer.CodeInternal, Message: "x"}); err != nil {
			t.Fatal(err)
		}
		waitUnread(t, c, bound+1)
		n, last := readAll(t, c)
		if n != bound || last == nil || last.Err == nil || last.Err.Code != infer.CodeInternal {
			t.Errorf("got %d tokens and %+v, want %d and the worker's error", n, last, bound)
		}
		if _, err := h.g.OpenSink(2, &infer.Request{}, &infer.Sink{Events: make(chan infer.Event)}); err == nil {
			t.Error("an unbuffered sink channel was accepted")
		}
	})
}

// TestOpenFailingWhileLateEventsQueued: an open that fails after its call
// was registered, while late frames of an abandoned call under the same
// id had filled the channel and queued behind it. The failed open closed
// the channel under the goroutine sending the queue into it: "send on
// closed channel". With a sink, that goroutine would have kept feeding
// the stale events into the opener's channel. Both cases, several times
// each, since the failure races the receive loop.
func TestOpenFailingWhileLateEventsQueued(t *testing.T) {
	for i := range 6 {
		withSink := i%2 == 1
		gwSeg, wkSeg := newPair(t, 64<<10)
		g := NewGatewayEnd(gwSeg, GatewayEndConfig{CallBuffer: 100})
		w := NewWorkerEnd(wkSeg)
		runErr := make(chan error, 1)
		go func() { runErr <- g.Run() }()

		c, err := g.Open(1, &infer.Request{Model: "m", Prompt: "p"})
		if err != nil {
			t.Fatal(err)
		}
		c.Cancel() // id 1 is abandoned: its late frames are accepted
		// A submit of 40 KiB fills most of the 64 KiB request ring, so
		// the next one waits for room.
		big := strings.Repeat("x", 40<<10)
		if _, err := g.Open(2, &infer.Request{Model: "m", Prompt: big}); err != nil {
			t.Fatal(err)
		}
		var sink *infer.Sink
		if withSink {
			sink = &infer.Sink{Events: make(chan infer.Event, 16)}
		}
		openErr := make(chan error, 1)
		go func() {
			_, err := g.OpenSink(1, &infer.Request{Model: "m", Prompt: big}, sink)
			openErr <- err
		}()
		time.Sleep(20 * time.Millisecond) // the open has registered id 1
		for k := range 40 {
			if err := w.SendToken(1, infer.Token{Count: 1, Text: "late"}); err != nil {
				t.Fatal(k, err)
			}
		}
		time.Sleep(20 * time.Millisecond) // 16 in the channel, the rest queued
		g.Close()
		// The open usually fails on the closed ring; it may also have
		// found room just before. Either way nothing may panic.
		failed := <-openErr != nil
		if err := <-runErr; err != nil && !errors.Is(err, ErrClosed) {
			t.Error(err)
		}
		if withSink && failed {
			// The opener's channel is its own: still open, and no
			// stale event arrives in it once the open has failed.
			n := len(sink.Events)
			time.Sleep(10 * time.Millisecond)
			select {
			case _, ok := <-sink.Events:
				if !ok {
					t.Fatalf("round %d: the failed open closed the opener's channel", i)
				}
			default:
			}
			if len(sink.Events) > n {
				t.Errorf("round %d: %d stale events reached the opener's channel after the open failed", i, len(sink.Events)-n)
			}
		}
	}
}
