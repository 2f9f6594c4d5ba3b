//go:build linux

package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"h3infer/infer"
)

// helperEnv names the peer role a re-executed test binary plays.
const helperEnv = "H3INFER_TRANSPORT_HELPER"

// TestHelperProcess is the peer process of the two-process tests and
// benchmarks: the test binary re-executes itself with helperEnv set and the
// shared file as fd 3. Run directly, it does nothing.
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		return
	}
	f := os.NewFile(3, "peer")
	switch mode {
	case "uds-echo":
		if err := udsEcho(f); err != nil {
			t.Fatal(err)
		}
		return
	case "uds-stream", "uds-sink":
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if mode == "uds-stream" {
			err = udsStream(c)
		} else {
			err = udsSink(c)
		}
		if err != nil {
			t.Fatal(err)
		}
		return
	}
	seg, err := OpenSegment(f)
	if err != nil {
		t.Fatal(err)
	}
	defer seg.Close()
	switch mode {
	case "echo":
		err = ringEcho(seg)
	case "worker":
		err = fakeWorker(seg)
	case "garbage":
		err = garbageWorker(seg)
	case "stream":
		err = ringStream(seg)
	case "sink":
		err = ringSink(seg)
	case "tokens":
		err = tokenWorker(seg)
	default:
		err = fmt.Errorf("unknown helper mode %q", mode)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// garbageWorker says it is ready, then answers the first submit by writing
// random bytes into its response ring and publishing them, as a worker with
// a wild pointer might; it then waits for the gateway to close the ring.
func garbageWorker(seg *Segment) error {
	w := NewWorkerEnd(seg)
	if err := w.SendReady(Ready{PID: uint32(os.Getpid()), Slots: 1, Models: []infer.ModelInfo{{Name: "demo", ContextLength: 2048}}}); err != nil {
		return err
	}
	if _, err := w.Recv(); err != nil {
		return err
	}
	r := &seg.rings[responseRing]
	off := r.prodTail & r.mask
	rng := rand.New(rand.NewPCG(uint64(os.Getpid()), 3))
	for i := range uint64(512) {
		r.data[off+i] = byte(rng.Uint32())
	}
	// A length in bounds, so only the frame checks can tell.
	binary.LittleEndian.PutUint32(r.data[off:], 100)
	r.prodTail += 512
	r.flush()
	for {
		if _, err := w.Recv(); err != nil {
			return nil
		}
	}
}

// ringEcho sends every request frame back on the response ring until the
// segment closes.
func ringEcho(seg *Segment) error {
	var buf []byte
	for {
		f, err := seg.recv(requestRing, buf)
		if errors.Is(err, ErrClosed) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := seg.send(responseRing, f.Type, f.ID, f.Payload); err != nil {
			if errors.Is(err, ErrClosed) {
				return nil
			}
			return err
		}
		buf = f.Payload
	}
}

// udsEcho is ringEcho's counterpart on a Unix stream socket: read a framed
// message, write it back with one write.
func udsEcho(f *os.File) error {
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 0, 1<<16)
	for {
		buf = buf[:frameHeaderSize]
		if _, err := io.ReadFull(c, buf); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		n := int(uint32(buf[0]) | uint32(buf[1])<<8 | uint32(buf[2])<<16 | uint32(buf[3])<<24)
		if n > cap(buf)-frameHeaderSize {
			return fmt.Errorf("frame of %d bytes", n)
		}
		buf = buf[:frameHeaderSize+n]
		if _, err := io.ReadFull(c, buf[frameHeaderSize:]); err != nil {
			return err
		}
		if _, err := c.Write(buf); err != nil {
			return err
		}
	}
}

// fakeWorker is a worker with a word-splitting "model", good enough to drive
// the gateway endpoint through every path. Prompts:
//
//	"fail":  an invalid_request error
//	"slow":  a token every millisecond until cancelled
//	"flood": tokens as fast as the ring takes them until cancelled
//	other:   one token per word, then done (length when MaxTokens cuts it)
//
// After each cancel of a live request it reports Stats, so the test can see
// that the cancel arrived.
func fakeWorker(seg *Segment) error {
	w := NewWorkerEnd(seg)
	defer w.Close()
	if err := w.SendReady(Ready{PID: uint32(os.Getpid()), Slots: 4, Models: []infer.ModelInfo{{Name: "demo", ContextLength: 2048}}}); err != nil {
		return err
	}
	var (
		mu     sync.Mutex
		active = make(map[uint64]chan struct{})
		stats  Stats
		wg     sync.WaitGroup
	)
	defer wg.Wait()
	for {
		f, err := w.Recv()
		if errors.Is(err, ErrClosed) {
			mu.Lock()
			for _, stop := range active {
				close(stop)
			}
			mu.Unlock()
			return nil
		}
		if err != nil {
			return err
		}
		switch f.Type {
		case FrameSubmit:
			s, err := DecodeSubmit(f.Payload)
			if err != nil {
				return err
			}
			stop := make(chan struct{})
			mu.Lock()
			active[f.ID] = stop
			stats.SequencesStarted++
			mu.Unlock()
			id := f.ID
			wg.Go(func() {
				generate(w, id, &s, stop)
				mu.Lock()
				if active[id] == stop {
					delete(active, id)
				}
				mu.Unlock()
			})
		case FrameCancel:
			mu.Lock()
			stop, ok := active[f.ID]
			if ok {
				close(stop)
				delete(active, f.ID)
				stats.SequencesCancelled++
			}
			report := stats
			mu.Unlock()
			if ok {
				if err := w.SendStats(report); err != nil && !errors.Is(err, ErrClosed) {
					return err
				}
			}
		}
	}
}

func generate(w *WorkerEnd, id uint64, s *infer.Request, stop <-chan struct{}) {
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}
	switch s.Prompt {
	case "fail":
		w.SendError(id, infer.Error{Code: infer.CodeInvalidRequest, Message: "fail requested"})
	case "slow", "flood":
		for i := 0; i < 1_000_000 && !stopped(); i++ {
			if w.SendToken(id, infer.Token{Count: 1, Text: "x"}) != nil {
				return
			}
			if s.Prompt == "slow" {
				time.Sleep(time.Millisecond)
			}
		}
	default:
		words := strings.Fields(s.Prompt)
		reason := infer.FinishStop
		if s.MaxTokens > 0 && int(s.MaxTokens) < len(words) {
			words, reason = words[:s.MaxTokens], infer.FinishLength
		}
		for _, word := range words {
			if stopped() || w.SendToken(id, infer.Token{Count: 1, Text: word + " "}) != nil {
				return
			}
		}
		w.SendDone(id, infer.Done{FinishReason: reason, PromptTokens: uint32(len(strings.Fields(s.Prompt))), CompletionTokens: uint32(len(words))})
	}
}

// startHelper starts the test binary as the peer process with files as fd 3
// onwards, and makes sure it is reaped.
func startHelper(tb testing.TB, mode string, files ...*os.File) *exec.Cmd {
	tb.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode)
	cmd.ExtraFiles = files
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return cmd
}

// waitHelper waits for the peer to exit on its own, killing it after a
// while, and reports a failed exit.
func waitHelper(tb testing.TB, cmd *exec.Cmd) {
	tb.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			tb.Errorf("peer process: %v", err)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
		tb.Errorf("peer process did not exit after close; killed")
	}
}

func TestTwoProcessEcho(t *testing.T) {
	checkGoroutines(t)
	seg, err := NewSegment(64 << 10)
	if err != nil {
		t.Fatal(err)
	}
	defer seg.Close()
	cmd := startHelper(t, "echo", seg.File())

	const frames = 4000
	rng := rand.New(rand.NewPCG(7, 11))
	sizes := make([]int, frames)
	for i := range sizes {
		switch r := rng.IntN(100); {
		case r < 70:
			sizes[i] = rng.IntN(256)
		case r < 95:
			sizes[i] = rng.IntN(16 << 10)
		default: // near the largest frame the ring takes
			sizes[i] = seg.MaxPayload() - rng.IntN(64)
		}
	}
	var wg sync.WaitGroup
	sendErr := make(chan error, 1)
	wg.Go(func() {
		for i, n := range sizes {
			typ := FrameType(1 + i%int(maxFrameType))
			if err := seg.send(requestRing, typ, uint64(i), pattern(uint64(i), n)); err != nil {
				sendErr <- fmt.Errorf("send %d: %w", i, err)
				return
			}
		}
		sendErr <- nil
	})
	var buf []byte
	for i, n := range sizes {
		f, err := seg.recv(responseRing, buf)
		if err != nil {
			seg.shut()
			wg.Wait()
			t.Fatalf("recv %d: %v", i, err)
		}
		wantType := FrameType(1 + i%int(maxFrameType))
		if f.Type != wantType || f.ID != uint64(i) || !bytes.Equal(f.Payload, pattern(uint64(i), n)) {
			seg.shut()
			wg.Wait()
			t.Fatalf("frame %d: got %v id %d with %d bytes, want %v with %d bytes", i, f.Type, f.ID, len(f.Payload), wantType, n)
		}
		buf = f.Payload
	}
	wg.Wait()
	if err := <-sendErr; err != nil {
		t.Fatal(err)
	}
	seg.shut()
	waitHelper(t, cmd)
}

// gatewayHarness is a GatewayEnd talking to a fakeWorker process.
type gatewayHarness struct {
	seg    *Segment
	g      *GatewayEnd
	cmd    *exec.Cmd
	ready  chan Ready
	stats  atomic.Pointer[Stats]
	runErr chan error
}

func startGateway(t *testing.T, callBuffer int) *gatewayHarness {
	t.Helper()
	seg, err := NewSegment(64 << 10)
	if err != nil {
		t.Fatal(err)
	}
	h := &gatewayHarness{seg: seg, ready: make(chan Ready, 1), runErr: make(chan error, 1)}
	h.g = NewGatewayEnd(seg, GatewayEndConfig{
		CallBuffer: callBuffer,
		OnReady:    func(r Ready) { h.ready <- r },
		OnStats:    func(s Stats) { h.stats.Store(&s) },
	})
	h.cmd = startHelper(t, "worker", seg.File())
	go func() { h.runErr <- h.g.Run() }()
	t.Cleanup(func() {
		h.g.Close()
		if err := <-h.runErr; !errors.Is(err, ErrClosed) {
			t.Errorf("Run returned %v, want ErrClosed", err)
		}
		if h.cmd.ProcessState == nil {
			waitHelper(t, h.cmd)
		}
		if err := seg.Close(); err != nil {
			t.Error(err)
		}
	})
	select {
	case r := <-h.ready:
		if int(r.PID) != h.cmd.Process.Pid || len(r.Models) != 1 || r.Models[0].Name != "demo" {
			t.Fatalf("got ready %+v from pid %d", r, h.cmd.Process.Pid)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no ready frame from worker")
	}
	return h
}

func (h *gatewayHarness) cancelled() uint64 {
	if s := h.stats.Load(); s != nil {
		return s.SequencesCancelled
	}
	return 0
}

// waitCancelled waits until the worker has reported n cancels.
func (h *gatewayHarness) waitCancelled(t *testing.T, n uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if s := h.stats.Load(); s != nil && s.SequencesCancelled >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker never reported %d cancels", n)
		}
		time.Sleep(time.Millisecond)
	}
}

// collect reads a call's events until the channel closes. It may be called
// from any goroutine.
func collect(t *testing.T, c *Call) (text string, last infer.Event, n int) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	var sb strings.Builder
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				return sb.String(), last, n
			}
			n++
			last = ev
			if ev.Done == nil && ev.Err == nil {
				sb.WriteString(ev.Token.Text)
			}
		case <-timeout:
			t.Errorf("call %d: events channel never closed", c.ID())
			return sb.String(), last, n
		}
	}
}

func TestGatewayWorker(t *testing.T) {
	checkGoroutines(t)
	h := startGateway(t, 16)

	t.Run("concurrent submits", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := range uint64(64) {
			wg.Go(func() {
				words := make([]string, 1+i%12)
				for j := range words {
					words[j] = fmt.Sprintf("w%d.%d", i, j)
				}
				c, err := h.g.Open(1000+i, &infer.Request{Model: "demo", Prompt: strings.Join(words, " ")})
				if err != nil {
					t.Error(err)
					return
				}
				text, last, _ := collect(t, c)
				if want := strings.Join(words, " ") + " "; text != want {
					t.Errorf("call %d: got text %q, want %q", c.ID(), text, want)
				}
				if last.Done == nil || last.Done.FinishReason != infer.FinishStop || last.Done.CompletionTokens != uint32(len(words)) {
					t.Errorf("call %d: got last event %+v, want done/stop with %d tokens", c.ID(), last, len(words))
				}
			})
		}
		wg.Wait()
	})

	t.Run("max tokens", func(t *testing.T) {
		c, err := h.g.Open(1, &infer.Request{Prompt: "a b c d e", MaxTokens: 2})
		if err != nil {
			t.Fatal(err)
		}
		text, last, _ := collect(t, c)
		if text != "a b " || last.Done == nil || last.Done.FinishReason != infer.FinishLength || last.Done.PromptTokens != 5 {
			t.Errorf("got %q, %+v; want \"a b \" ending in length", text, last.Done)
		}
	})

	t.Run("duplicate id", func(t *testing.T) {
		before := h.cancelled()
		c, err := h.g.Open(2, &infer.Request{Prompt: "slow"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.g.Open(2, &infer.Request{Prompt: "x"}); err == nil {
			t.Error("second Open with a live id succeeded")
		}
		c.Cancel()
		h.waitCancelled(t, before+1)
	})

	t.Run("error", func(t *testing.T) {
		c, err := h.g.Open(3, &infer.Request{Prompt: "fail"})
		if err != nil {
			t.Fatal(err)
		}
		_, last, n := collect(t, c)
		if n != 1 || last.Err == nil || last.Err.Code != infer.CodeInvalidRequest {
			t.Errorf("got %d events ending %+v, want one invalid_request error", n, last)
		}
	})

	t.Run("cancel", func(t *testing.T) {
		before := h.cancelled()
		c, err := h.g.Open(4, &infer.Request{Prompt: "slow"})
		if err != nil {
			t.Fatal(err)
		}
		if ev := <-c.Events(); ev.Done != nil || ev.Err != nil || ev.Token.Text != "x" {
			t.Fatalf("got first event %+v, want a token", ev)
		}
		c.Cancel()
		c.Cancel()
		_, last, _ := collect(t, c)
		if last.Done != nil || last.Err != nil {
			t.Errorf("cancelled call delivered terminal event %+v", last)
		}
		h.waitCancelled(t, before+1)
		// The id is free again once the call has ended.
		c2, err := h.g.Open(4, &infer.Request{Prompt: "again"})
		if err != nil {
			t.Fatal(err)
		}
		if text, _, _ := collect(t, c2); text != "again " {
			t.Errorf("reopened id: got %q", text)
		}
	})

	t.Run("overflow", func(t *testing.T) {
		before := h.cancelled()
		c, err := h.g.Open(5, &infer.Request{Prompt: "flood"})
		if err != nil {
			t.Fatal(err)
		}
		// Read nothing until the worker confirms the overflow cancel.
		h.waitCancelled(t, before+1)
		_, last, n := collect(t, c)
		if last.Err == nil || last.Err.Code != infer.CodeOverflow {
			t.Fatalf("got last event %+v, want an overflow error", last)
		}
		if n != 16+1 {
			t.Errorf("got %d events, want the 16 buffered tokens and the error", n)
		}
	})
}

func TestGatewayWorkerExited(t *testing.T) {
	checkGoroutines(t)
	h := startGateway(t, 0)
	c, err := h.g.Open(1, &infer.Request{Prompt: "slow"})
	if err != nil {
		t.Fatal(err)
	}
	if ev := <-c.Events(); ev.Token.Text != "x" {
		t.Fatalf("got %+v, want a token", ev)
	}
	// What the supervisor does when the worker dies: reap it, close the end.
	if err := h.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	h.cmd.Wait()
	h.g.Close()
	_, last, _ := collect(t, c)
	if last.Err == nil || last.Err.Code != infer.CodeWorkerLost || !strings.Contains(last.Err.Message, "worker exited") {
		t.Errorf("got last event %+v, want worker_lost \"worker exited\"", last)
	}
	if _, err := h.g.Open(2, &infer.Request{Prompt: "x"}); !errors.Is(err, ErrClosed) {
		t.Errorf("Open after close: got %v, want ErrClosed", err)
	}
}

// TestGatewayCorruptRing: a worker that scribbles over its ring fails every
// call with worker_lost and makes Run report ErrCorrupt; the gateway side
// neither crashes nor misreads the garbage as a frame.
func TestGatewayCorruptRing(t *testing.T) {
	checkGoroutines(t)
	seg, err := NewSegment(64 << 10)
	if err != nil {
		t.Fatal(err)
	}
	defer seg.Close()
	ready := make(chan Ready, 1)
	g := NewGatewayEnd(seg, GatewayEndConfig{OnReady: func(r Ready) { ready <- r }})
	cmd := startHelper(t, "garbage", seg.File())
	runErr := make(chan error, 1)
	go func() { runErr <- g.Run() }()
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		t.Fatal("no ready frame")
	}
	c, err := g.Open(1, &infer.Request{Prompt: "hello"})
	if err != nil {
		t.Fatal(err)
	}
	_, last, n := collect(t, c)
	if n != 1 || last.Err == nil || last.Err.Code != infer.CodeWorkerLost {
		t.Errorf("got %d events ending in %+v, want only a worker_lost error", n, last)
	}
	select {
	case err := <-runErr:
		if !errors.Is(err, ErrCorrupt) {
			t.Errorf("Run returned %v, want ErrCorrupt", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after the ring went corrupt")
	}
	waitHelper(t, cmd)
}
