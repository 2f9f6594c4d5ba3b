//go:build linux

package transport

import (
	"errors"
	"testing"
	"time"

	"h3infer/infer"
)

// TestGatewayProtocolViolations: a worker that sends a well-formed frame
// no sound worker sends (for a request that was never opened or has
// ended, or of a kind only the gateway sends) ends Run with ErrProtocol
// and fails the calls it held with worker_lost, while the late frames a
// sound worker does send for a call the gateway cancelled are dropped
// quietly.
func TestGatewayProtocolViolations(t *testing.T) {
	tests := map[string]struct {
		send func(w *WorkerEnd) error // after a call with id 1 has ended by its infer.Done
		want error                    // nil: the endpoint keeps working
	}{
		"token for a request never opened": {
			send: func(w *WorkerEnd) error { return w.SendToken(99, infer.Token{Count: 1, Text: "x"}) },
			want: ErrProtocol,
		},
		"done for a request never opened": {
			send: func(w *WorkerEnd) error { return w.SendDone(1<<63, infer.Done{FinishReason: infer.FinishStop}) },
			want: ErrProtocol,
		},
		"token after the request's done": {
			send: func(w *WorkerEnd) error { return w.SendToken(1, infer.Token{Count: 1, Text: "late"}) },
			want: ErrProtocol,
		},
		"submit from the worker": {
			send: func(w *WorkerEnd) error {
				return w.seg.send(responseRing, FrameSubmit, 5, AppendSubmit(nil, &infer.Request{}))
			},
			want: ErrProtocol,
		},
		"late token for a cancelled request": {
			send: func(w *WorkerEnd) error { return w.SendToken(3, infer.Token{Count: 1, Text: "late"}) },
		},
		"late done for a cancelled request": {
			send: func(w *WorkerEnd) error { return w.SendDone(3, infer.Done{FinishReason: infer.FinishStop}) },
		},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			checkGoroutines(t)
			gwSeg, wkSeg := newPair(t, MinRingSize)
			g := NewGatewayEnd(gwSeg, GatewayEndConfig{})
			w := NewWorkerEnd(wkSeg)
			runErr := make(chan error, 1)
			go func() { runErr <- g.Run() }()
			defer func() {
				g.Close()
				<-runErr
			}()

			// Call 1 ends normally; call 3 is cancelled by its client; call
			// 2 is open while the frame under test arrives.
			calls := make([]*Call, 4)
			for _, id := range []uint64{1, 2, 3} {
				c, err := g.Open(id, &infer.Request{Prompt: "p"})
				if err != nil {
					t.Fatal(err)
				}
				calls[id] = c
			}
			c1, c2, c3 := calls[1], calls[2], calls[3]
			if err := w.SendDone(1, infer.Done{FinishReason: infer.FinishStop}); err != nil {
				t.Fatal(err)
			}
			if _, last, _ := collect(t, c1); last.Done == nil {
				t.Fatalf("call 1 ended with %+v, want its done", last)
			}
			c3.Cancel()
			if err := tt.send(w); err != nil {
				t.Fatal(err)
			}
			if tt.want == nil {
				// The endpoint still carries call 2 to its end.
				if err := w.SendDone(2, infer.Done{FinishReason: infer.FinishStop}); err != nil {
					t.Fatal(err)
				}
				if _, last, _ := collect(t, c2); last.Done == nil {
					t.Errorf("call 2 ended with %+v, want its done", last)
				}
				select {
				case err := <-runErr:
					t.Fatalf("Run ended with %v", err)
				default:
				}
				return
			}
			_, last, _ := collect(t, c2)
			if last.Err == nil || last.Err.Code != infer.CodeWorkerLost {
				t.Errorf("open call ended with %+v, want worker_lost", last)
			}
			select {
			case err := <-runErr:
				runErr <- err
				if !errors.Is(err, tt.want) {
					t.Errorf("Run returned %v, want %v", err, tt.want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Run did not end")
			}
		})
	}
}

// TestAbandonedIDsBounded: the ids of cancelled calls kept for their late
// frames stay at maxAbandoned however many calls are cancelled.
func TestAbandonedIDsBounded(t *testing.T) {
	gwSeg, _ := newPair(t, MinRingSize)
	g := NewGatewayEnd(gwSeg, GatewayEndConfig{})
	for id := range uint64(3 * maxAbandoned) {
		g.abandon(id)
	}
	if n := len(g.abandoned); n != maxAbandoned {
		t.Errorf("%d abandoned ids kept, want %d", n, maxAbandoned)
	}
	for _, id := range []uint64{0, 2*maxAbandoned - 1} {
		if _, ok := g.abandoned[id]; ok {
			t.Errorf("id %d, abandoned long ago, still kept", id)
		}
	}
	if _, ok := g.abandoned[3*maxAbandoned-1]; !ok {
		t.Error("the latest abandoned id was dropped")
	}
}
