//go:build linux

package transport

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"h3infer/infer"
	"h3infer/priority"
)

func TestSendTokenDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	_, wk := newPair(t, 64<<10)
	w := NewWorkerEnd(wk)
	tok := infer.Token{Count: 1, Text: "hello"}
	// 1000 records of 32 bytes fit in the ring, so nobody needs to drain it.
	allocs := testing.AllocsPerRun(1000, func() {
		if err := w.SendToken(7, tok); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("SendToken made %v allocations, want 0", allocs)
	}
}

func TestWorkerEndRecv(t *testing.T) {
	checkGoroutines(t)
	gw, wk := newPair(t, MinRingSize)
	w := NewWorkerEnd(wk)
	want := infer.Request{Model: "demo", Prompt: "hi", Urgency: 1}
	if err := gw.send(requestRing, FrameSubmit, 42, AppendSubmit(nil, &want)); err != nil {
		t.Fatal(err)
	}
	f, err := w.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeSubmit(f.Payload)
	if f.Type != FrameSubmit || f.ID != 42 || err != nil || got.Prompt != "hi" || got.Urgency != 1 {
		t.Errorf("got %v %d %+v (%v), want submit 42 %+v", f.Type, f.ID, got, err, want)
	}
	w.Close()
	if _, err := w.Recv(); !errors.Is(err, ErrClosed) {
		t.Errorf("Recv after Close: got %v, want ErrClosed", err)
	}
	if err := w.SendHeartbeat(); !errors.Is(err, ErrClosed) {
		t.Errorf("send after Close: got %v, want ErrClosed", err)
	}
}

// TestSendTokens checks that a batch arrives as one token frame per element,
// in order, each with its own request id and text.
func TestSendTokens(t *testing.T) {
	checkGoroutines(t)
	gw, wk := newPair(t, MinRingSize)
	w := NewWorkerEnd(wk)
	var batch []TokenOut
	for i := range 40 {
		batch = append(batch, TokenOut{ID: uint64(100 + i%7), Token: infer.Token{Count: uint32(i), Text: strings.Repeat("x", i)}})
	}
	for round := range 3 {
		// 40 frames of up to 72 bytes outgrow a 4 KiB ring, so each batch
		// is published in parts while the reader below drains it.
		done := make(chan error, 1)
		go func() { done <- w.SendTokens(batch) }()
		for i, want := range batch {
			f, err := gw.recv(responseRing, nil)
			if err != nil {
				t.Fatalf("round %d frame %d: %v", round, i, err)
			}
			got, err := DecodeToken(f.Payload)
			if f.Type != FrameToken || f.ID != want.ID || err != nil || !reflect.DeepEqual(got, want.Token) {
				t.Fatalf("round %d frame %d: got %v %d %+v (%v), want %d %+v", round, i, f.Type, f.ID, got, err, want.ID, want.Token)
			}
		}
		if err := <-done; err != nil {
			t.Fatalf("SendTokens: %v", err)
		}
	}
}

// TestHandOffByClass checks which calls make the receive loop yield after
// their first token: urgent and normal requests, never bulk ones or
// control calls, and only once.
func TestHandOffByClass(t *testing.T) {
	checkGoroutines(t)
	gwSeg, _ := newPair(t, 64<<10)
	g := NewGatewayEnd(gwSeg, GatewayEndConfig{})
	defer g.Close()
	for i, class := range []priority.Class{priority.Urgent, priority.Normal, priority.Bulk} {
		c, err := g.Open(uint64(i)+1, &infer.Request{Model: "demo", Prompt: "hi", Class: class})
		if err != nil {
			t.Fatal(err)
		}
		if want := class != priority.Bulk; c.handOff != want {
			t.Errorf("class %v: handOff %v, want %v", class, c.handOff, want)
		}
		if class == priority.Urgent {
			c.deliver(infer.Event{Token: infer.Token{Count: 1, Text: "a"}})
			if c.handOff {
				t.Error("handOff still set after the first token")
			}
		}
	}
	c, err := g.Control(100, &Control{})
	if err != nil {
		t.Fatal(err)
	}
	if c.handOff {
		t.Error("a control call hands off")
	}
}
