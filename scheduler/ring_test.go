//go:build linux

package scheduler

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/transport"
)

// ringWorker is a worker handle over a real shared-memory segment; an
// in-process goroutine plays the worker process on the other end.
type ringWorker struct {
	id    int
	slots int
	end   *transport.GatewayEnd
}

func (w *ringWorker) ID() int     { return w.id }
func (w *ringWorker) Ready() bool { return true }
func (w *ringWorker) Slots() int  { return w.slots }
func (w *ringWorker) Open(id uint64, s *infer.Request) (infer.Call, error) {
	c, err := w.end.Open(id, s)
	if err != nil {
		return nil, err
	}
	return c, nil
}

type staticSet []Backend

func (s staticSet) Backends(string) []Backend { return s }

// echoWorker answers each prompt word by word. A prompt starting with "hold"
// sends one token and then waits for the gateway's cancel.
func echoWorker(t *testing.T, we *transport.WorkerEnd, cancelled chan<- uint64) {
	for {
		f, err := we.Recv()
		if err != nil {
			if !errors.Is(err, transport.ErrClosed) {
				t.Errorf("worker receive: %v", err)
			}
			return
		}
		switch f.Type {
		case transport.FrameCancel:
			cancelled <- f.ID
		case transport.FrameSubmit:
			sub, err := transport.DecodeSubmit(f.Payload)
			if err != nil {
				t.Errorf("decode submit: %v", err)
				return
			}
			words := strings.Fields(sub.Prompt)
			if len(words) > 0 && words[0] == "hold" {
				we.SendToken(f.ID, infer.Token{Count: 1, Text: "held"})
				continue
			}
			for _, w := range words {
				we.SendToken(f.ID, infer.Token{Count: 1, Text: w})
			}
			we.SendDone(f.ID, infer.Done{FinishReason: infer.FinishStop, PromptTokens: uint32(len(words)), CompletionTokens: uint32(len(words))})
		}
	}
}

func TestDispatchOverRealRing(t *testing.T) {
	seg, err := transport.NewSegment(0)
	if err != nil {
		t.Fatal(err)
	}
	ge := transport.NewGatewayEnd(seg, transport.GatewayEndConfig{})
	we := transport.NewWorkerEnd(seg)
	cancelled := make(chan uint64, 16)
	var wg sync.WaitGroup
	wg.Go(func() { ge.Run() })
	wg.Go(func() { echoWorker(t, we, cancelled) })
	s, err := New(Config{}, staticSet{&ringWorker{id: 1, slots: 1, end: ge}}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		ge.Close()
		wg.Wait()
		seg.Close()
	})

	collect := func(st *Dispatch) (string, *infer.Done) {
		var text []string
		for ev := range st.Events() {
			switch {
			case ev.Err != nil:
				t.Fatalf("worker error: %+v", ev.Err)
			case ev.Done != nil:
				return strings.Join(text, " "), ev.Done
			default:
				text = append(text, ev.Token.Text)
			}
		}
		t.Fatal("events ended without done")
		return "", nil
	}

	st, _, err := s.Submit(context.Background(), &Request{Job: infer.Request{Model: "m", Prompt: "a b c"}})
	if err != nil {
		t.Fatal(err)
	}
	if text, d := collect(st); text != "a b c" || d.CompletionTokens != 3 {
		t.Errorf("got %q %+v, want the prompt echoed", text, d)
	}
	st.Close()

	// A held request occupies the only slot; the next one queues until the
	// held stream is closed, which must cancel it on the worker.
	held, _, err := s.Submit(context.Background(), &Request{Job: infer.Request{Prompt: "hold"}})
	if err != nil {
		t.Fatal(err)
	}
	if ev := <-held.Events(); ev.Token.Text != "held" {
		t.Fatalf("first event %+v, want the held token", ev)
	}
	next := make(chan result, 1)
	go func() {
		st, _, err := s.Submit(context.Background(), &Request{Job: infer.Request{Prompt: "after"}})
		next <- result{st, err}
	}()
	waitFor(t, "request to queue", func() bool { return s.Stats().Queued == 1 })
	held.Close()
	select {
	case id := <-cancelled:
		if id != held.ID() {
			t.Errorf("worker cancelled request %d, want %d", id, held.ID())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("closing the stream did not cancel the request on the worker")
	}
	r := recv(t, next)
	if r.err != nil {
		t.Fatal(r.err)
	}
	if text, _ := collect(r.st); text != "after" {
		t.Errorf("queued request got %q", text)
	}
	r.st.Close()
}
