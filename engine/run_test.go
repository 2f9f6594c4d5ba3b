package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/ort"
	"h3infer/transport"
	"h3infer/workerconf"
)

// ringWorker is Run in this process on a real segment, with the
// gateway's end of the ring in the test's hands.
type ringWorker struct {
	end   *transport.GatewayEnd
	ready chan transport.Ready
	// hello is the worker's Ready frame.
	hello transport.Ready

	mu      sync.Mutex
	stats   transport.Stats
	reports int // stats frames received
}

func startRingWorker(t *testing.T, slots int) *ringWorker {
	t.Helper()
	needModel(t)
	return startRingWorkerWith(t, slots, demo.ModelDir(), 0)
}

// startRingWorkerWith serves the model in dir under the name "demo".
func startRingWorkerWith(t testing.TB, slots int, dir string, kvBudget int64) *ringWorker {
	t.Helper()
	return startRingWorkerSpec(t, slots, workerconf.Model{Name: "demo", Dir: dir}, kvBudget)
}

// startRingWorkerSpec is startRingWorkerWith for a model spec of its own
// (provider, device-resident cache).
func startRingWorkerSpec(t testing.TB, slots int, spec workerconf.Model, kvBudget int64) *ringWorker {
	t.Helper()
	seg, err := transport.NewSegment(0)
	if err != nil {
		t.Fatal(err)
	}
	// The worker takes ownership of its descriptor, as a child owns fd 3.
	fd, err := syscall.Dup(int(seg.File().Fd()))
	if err != nil {
		t.Fatal(err)
	}
	rw := &ringWorker{ready: make(chan transport.Ready, 1)}
	rw.end = transport.NewGatewayEnd(seg, transport.GatewayEndConfig{
		OnReady: func(r transport.Ready) { rw.ready <- r },
		OnStats: func(s transport.Stats) {
			rw.mu.Lock()
			rw.stats = s
			rw.reports++
			rw.mu.Unlock()
		},
	})
	ctx, cancel := context.WithCancel(context.Background())
	s := workerconf.Settings{
		Models:        []workerconf.Model{spec},
		ORTLib:        demo.Lib(),
		Slots:         slots,
		KVCacheBytes:  kvBudget,
		StatsInterval: 5 * time.Millisecond,
		// Everything on the loop's thread; the bulk lane has tests of
		// its own.
		Nice: new(0),
	}
	log := testLogger(t)
	var wg sync.WaitGroup
	workerErr := make(chan error, 1)
	wg.Go(func() {
		workerErr <- Run(ctx, os.NewFile(uintptr(fd), "ring"), Config{Settings: s, Load: ortLoad(s, log)}, log)
	})
	wg.Go(func() { rw.end.Run() })
	t.Cleanup(func() {
		cancel()
		if err := <-workerErr; err != nil {
			t.Errorf("Run: %v", err)
		}
		rw.end.Close()
		wg.Wait()
		seg.Close()
	})
	select {
	case r := <-rw.ready:
		// Slots 0: the worker derives them (TestWorkerDerivesSlots).
		if (slots != 0 && r.Slots != uint32(slots)) || len(r.Models) != 1 || r.Models[0].Name != "demo" {
			t.Fatalf("ready = %+v", r)
		}
		rw.hello = r
	case err := <-workerErr:
		t.Fatalf("worker ended before ready: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("no ready frame")
	}
	return rw
}

func (rw *ringWorker) latestStats() transport.Stats {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	return rw.stats
}

// waitStats polls the worker's reports until ok holds.
func (rw *ringWorker) waitStats(t *testing.T, ok func(transport.Stats) bool) transport.Stats {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if s := rw.latestStats(); ok(s) {
			return s
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("stats never matched; last %+v", rw.latestStats())
	return transport.Stats{}
}

// result is what a call delivered.
type result struct {
	text     string
	tokens   uint32
	logprobs []infer.TokenLogprob
	done     *infer.Done
	err      *infer.Error
}

func collect(t *testing.T, c *transport.Call) result {
	t.Helper()
	var r result
	var b strings.Builder
	timeout := time.After(60 * time.Second)
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				r.text = b.String()
				return r
			}
			switch {
			case ev.Done != nil:
				r.done = ev.Done
			case ev.Err != nil:
				r.err = ev.Err
			default:
				b.WriteString(ev.Token.Text)
				r.tokens += ev.Token.Count
				r.logprobs = append(r.logprobs, ev.Token.Logprobs...)
			}
		case <-timeout:
			t.Fatalf("call %d did not end", c.ID())
		}
	}
}

// With workers.slots 0 the worker announces as many slots as full-context
// sequences of its model fit in its KV budget, within the bounds of
// workerconf.AutoSlots, and runs that many at once: they all start
// without waiting for one another.
func TestWorkerDerivesSlots(t *testing.T) {
	needModel(t)
	m, err := ort.LoadModel(demo.ModelDir(), ort.Options{Name: "demo"})
	if err != nil {
		t.Fatal(err)
	}
	perSeq := m.KVBytes(1, int(m.Info().ContextLength))
	m.Close()
	for name, tc := range map[string]struct {
		budget int64
		slots  int
		fit    int
	}{
		"in range": {6*perSeq + perSeq/2, 6, 6},
		"floor":    {perSeq + perSeq/2, workerconf.MinAutoSlots, 1},
		"ceiling":  {0, workerconf.MaxAutoSlots, int(workerconf.DefaultKVCacheBytes / perSeq)},
	} {
		t.Run(name, func(t *testing.T) {
			rw := startRingWorkerWith(t, 0, demo.ModelDir(), tc.budget)
			if rw.hello.Slots != uint32(tc.slots) || rw.hello.SlotsFit != uint32(tc.fit) {
				t.Fatalf("ready slots %d, fit %d; want %d, %d", rw.hello.Slots, rw.hello.SlotsFit, tc.slots, tc.fit)
			}
			// Every slot takes a request; one more is refused as busy.
			var calls []infer.Call
			for i := range tc.slots {
				c, err := rw.end.Open(uint64(i+1), &infer.Request{Model: "demo", Prompt: "The gateway ", MaxTokens: 2000, IgnoreEOS: true})
				if err != nil {
					t.Fatal(err)
				}
				calls = append(calls, c)
			}
			rw.waitStats(t, func(s transport.Stats) bool { return s.Active == uint32(tc.slots) })
			c, err := rw.end.Open(uint64(tc.slots+1), &infer.Request{Model: "demo", Prompt: "x", MaxTokens: 1})
			if err != nil {
				t.Fatal(err)
			}
			if ev := <-c.Events(); ev.Err == nil || !strings.Contains(ev.Err.Message, "slots in use") {
				t.Errorf("request past the slots: got %+v, want a busy error", ev)
			}
			for _, c := range calls {
				c.Cancel()
			}
		})
	}
}

func TestWorkerMatchesGenerate(t *testing.T) {
	rw := startRingWorker(t, 2)
	m := loadTestModel(t)
	submits := []*infer.Request{
		{Model: "demo", Prompt: "The gateway ", MaxTokens: 50},
		{Model: "demo", Prompt: "A worker ", MaxTokens: 50, Temperature: 0.9, TopP: 0.9, Seed: 5, HasSeed: true, Stop: []string{"e t"}},
		{Model: "demo", Messages: []infer.ChatMessage{{Role: "user", Content: "tokens"}}, MaxTokens: 30},
	}
	calls := make([]*transport.Call, len(submits))
	for i, s := range submits {
		c, err := rw.end.Open(uint64(i+1), s)
		if err != nil {
			t.Fatal(err)
		}
		calls[i] = c
	}
	served := 0
	for i, c := range calls {
		got := collect(t, c)
		wantText, wantDone, err := Generate(context.Background(), m, submits[i])
		if err != nil {
			t.Fatal(err)
		}
		if i == 2 && got.err != nil {
			// The third call found both slots busy (on a loaded machine
			// the first may have finished by then, and it is served:
			// TestWorkerDerivesSlots holds the refusal itself).
			if !strings.Contains(got.err.Message, "slots") {
				t.Errorf("call 3: got %+v, want a busy error or its answer", got)
			}
			continue
		}
		served++
		if got.err != nil || got.done == nil {
			t.Fatalf("call %d: got %+v", i+1, got)
		}
		if got.text != wantText || *got.done != wantDone {
			t.Errorf("call %d: ring gave %q %+v, Generate %q %+v", i+1, got.text, *got.done, wantText, wantDone)
		}
		if got.tokens != got.done.CompletionTokens {
			t.Errorf("call %d: token frames counted %d, done says %d", i+1, got.tokens, got.done.CompletionTokens)
		}
	}
	s := rw.waitStats(t, func(s transport.Stats) bool { return s.SequencesFinished == uint64(served) && s.Active == 0 })
	if s.SequencesStarted != uint64(served) || s.TokensGenerated == 0 {
		t.Errorf("stats = %+v, want %d started and some tokens", s, served)
	}
}

// The ring carries every sampling parameter to the worker's sampler: each
// request, run beside the others, makes the text Generate makes.
func TestWorkerSamplingMatchesGenerate(t *testing.T) {
	subs := samplingSubmits()[:4]
	rw := startRingWorker(t, len(subs))
	m := loadTestModel(t)
	calls := make([]*transport.Call, len(subs))
	for i := range subs {
		c, err := rw.end.Open(uint64(i+1), &subs[i])
		if err != nil {
			t.Fatal(err)
		}
		calls[i] = c
	}
	for i, c := range calls {
		got := collect(t, c)
		wantText, wantDone, err := Generate(context.Background(), m, &subs[i])
		if err != nil {
			t.Fatal(err)
		}
		if got.err != nil || got.done == nil {
			t.Fatalf("call %d: got %+v", i+1, got)
		}
		if got.text != wantText || *got.done != wantDone {
			t.Errorf("call %d: ring gave %q %+v, Generate %q %+v", i+1, got.text, *got.done, wantText, wantDone)
		}
	}
}

// The ring carries each token's logprob entries as the sequence made
// them: a request alone in the worker's batch gets exactly the entries
// it gets from Generate, the end token's included.
func TestWorkerLogprobsMatchGenerate(t *testing.T) {
	rw := startRingWorker(t, 1)
	m := loadTestModel(t)
	subs := []infer.Request{
		// Greedy, to the end token.
		{Model: "demo", Prompt: "The gateway", MaxTokens: 400, Logprobs: true, TopLogprobs: 5},
		{Model: "demo", Prompt: "A worker ", MaxTokens: 50, Temperature: 0.9, TopP: 0.9, Seed: 5, HasSeed: true, Stop: []string{"e t"},
			Logprobs: true},
		{Model: "demo", Messages: []infer.ChatMessage{{Role: "user", Content: "tokens"}}, MaxTokens: 30, Temperature: 1.3,
			TopK: 10, PresencePenalty: 0.5, LogitBias: []infer.LogitBias{{Token: 'e', Bias: -1}}, Seed: 2, HasSeed: true,
			Logprobs: true, TopLogprobs: infer.MaxTopLogprobs},
		{Model: "demo", Prompt: "The gateway", MaxTokens: 20},
	}
	for i := range subs {
		c, err := rw.end.Open(uint64(i+1), &subs[i])
		if err != nil {
			t.Fatal(err)
		}
		got := collect(t, c)
		if got.err != nil || got.done == nil {
			t.Fatalf("call %d: got %+v", i+1, got)
		}
		var want []infer.TokenLogprob
		wantDone, err := generate(context.Background(), m, &subs[i], func(tok infer.Token) { want = append(want, tok.Logprobs...) })
		if err != nil {
			t.Fatal(err)
		}
		if *got.done != wantDone || !reflect.DeepEqual(got.logprobs, want) {
			t.Errorf("call %d: ring gave %+v %+v\nGenerate %+v %+v", i+1, *got.done, got.logprobs, wantDone, want)
		}
		checkLogprobs(t, fmt.Sprintf("call %d", i+1), &subs[i], got.logprobs, *got.done)
		if i == 0 && got.done.FinishReason != infer.FinishStop {
			t.Errorf("call 1 ended %+v; the test needs it to end with the end token", *got.done)
		}
	}
}

func TestWorkerRequestErrors(t *testing.T) {
	rw := startRingWorker(t, 2)
	tests := map[string]struct {
		s    infer.Request
		code string
	}{
		"unknown model":  {infer.Request{Model: "gpt-9", Prompt: "x"}, infer.CodeModelNotFound},
		"prompt too big": {infer.Request{Model: "demo", Prompt: strings.Repeat("ab", 2048)}, infer.CodeContextLength},
		"bad top_p":      {infer.Request{Model: "demo", Prompt: "x", TopP: 3}, infer.CodeInvalidRequest},
		"bad min_p":      {infer.Request{Model: "demo", Prompt: "x", MinP: 2}, infer.CodeInvalidRequest},
		// Refused by the ring's decoder before the worker's own checks.
		"top_logprobs without logprobs": {infer.Request{Model: "demo", Prompt: "x", TopLogprobs: 2}, infer.CodeInvalidRequest},
		"top_logprobs over the bound":   {infer.Request{Model: "demo", Prompt: "x", Logprobs: true, TopLogprobs: 21}, infer.CodeInvalidRequest},
		// Found at the prefill, after admission.
		"logit_bias past the vocabulary": {infer.Request{Model: "demo", Prompt: "x", LogitBias: []infer.LogitBias{{Token: 70000, Bias: 1}}}, infer.CodeInvalidRequest},
	}
	id := uint64(100)
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			id++
			c, err := rw.end.Open(id, &tc.s)
			if err != nil {
				t.Fatal(err)
			}
			if got := collect(t, c); got.err == nil || got.err.Code != tc.code {
				t.Errorf("got %+v, want error %s", got, tc.code)
			}
		})
	}
}

func TestWorkerCancel(t *testing.T) {
	rw := startRingWorker(t, 1)
	long := &infer.Request{Model: "demo", Prompt: "The ", Temperature: 1, Seed: 1, HasSeed: true}
	requireLong(t, loadTestModel(t), long)
	c, err := rw.end.Open(1, long)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-c.Events():
		if ev.Done != nil || ev.Err != nil {
			t.Fatalf("first event %+v, want a token", ev)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no token")
	}
	c.Cancel()
	s := rw.waitStats(t, func(s transport.Stats) bool { return s.SequencesCancelled == 1 })
	if s.Active != 0 || s.SequencesFinished != 0 {
		t.Errorf("stats after cancel = %+v", s)
	}
	// The freed slot takes the next request.
	c2, err := rw.end.Open(2, &infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 3})
	if err != nil {
		t.Fatal(err)
	}
	if got := collect(t, c2); got.done == nil {
		t.Errorf("after cancel: got %+v", got)
	}
}

func TestWorkerExitsWhenRingCloses(t *testing.T) {
	needModel(t)
	seg, err := transport.NewSegment(0)
	if err != nil {
		t.Fatal(err)
	}
	defer seg.Close()
	fd, err := syscall.Dup(int(seg.File().Fd()))
	if err != nil {
		t.Fatal(err)
	}
	end := transport.NewGatewayEnd(seg, transport.GatewayEndConfig{})
	done := make(chan error, 1)
	go func() {
		s := workerconf.Settings{Models: []workerconf.Model{{Name: "demo", Dir: demo.ModelDir()}}, ORTLib: demo.Lib()}
		done <- Run(context.Background(), os.NewFile(uintptr(fd), "ring"), Config{Settings: s, Load: ortLoad(s, testLogger(t))}, testLogger(t))
	}()
	end.Close()
	select {
	case err := <-done:
		if err != nil && !errors.Is(err, transport.ErrClosed) {
			t.Errorf("Run = %v, want a clean exit", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("worker did not exit after the ring closed")
	}
}

// requireLong checks that s makes a long generation, so that a test can
// act on it while it runs.
func requireLong(t *testing.T, m Model, s *infer.Request) {
	t.Helper()
	const enough = 500
	capped := *s
	capped.MaxTokens = enough
	_, done, err := Generate(context.Background(), m, &capped)
	if err != nil {
		t.Fatal(err)
	}
	if done.FinishReason != infer.FinishLength {
		t.Fatalf("precondition: %+v stops after %d tokens, want at least %d", s, done.CompletionTokens, enough)
	}
}
