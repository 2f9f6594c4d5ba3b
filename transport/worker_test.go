//go:build linux

package transport

import (
	"errors"
	"testing"
)

func TestSendTokenDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	_, wk := newPair(t, 64<<10)
	w := NewWorkerEnd(wk)
	tok := Token{Count: 1, Text: "hello"}
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
	want := Submit{Model: "demo", Prompt: "hi", Urgency: 1}
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
