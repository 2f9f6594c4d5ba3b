package engine

import (
	"context"
	"fmt"
	"math"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"h3infer/infer"
	"h3infer/priority"
	"h3infer/transport"
	"h3infer/workerconf"
)

// recorder is the ring side of a workerLoop driven in process: it keeps
// every frame the loop sends, in order.
type recorder struct {
	mu       sync.Mutex
	text     map[uint64]*strings.Builder
	tokens   map[uint64]int
	logprobs map[uint64][]infer.TokenLogprob
	done     map[uint64]infer.Done
	errs     map[uint64]infer.Error
	order    []uint64 // request id of every token frame, in sending order
	// onToken, when set, runs in the loop's goroutine after each token is
	// recorded; tests use it to act at an exact point of the stream.
	onToken func(id uint64)
	beats   atomic.Uint64 // heartbeats the loop has counted
}

func newRecorder() *recorder {
	return &recorder{
		text:     map[uint64]*strings.Builder{},
		tokens:   map[uint64]int{},
		logprobs: map[uint64][]infer.TokenLogprob{},
		done:     map[uint64]infer.Done{},
		errs:     map[uint64]infer.Error{},
	}
}

func (r *recorder) SendTokens(ts []transport.TokenOut) error {
	for _, t := range ts {
		if err := r.SendToken(t.ID, t.Token); err != nil {
			return err
		}
	}
	return nil
}

func (r *recorder) SendToken(id uint64, t infer.Token) error {
	r.mu.Lock()
	if r.text[id] == nil {
		r.text[id] = &strings.Builder{}
	}
	r.text[id].WriteString(t.Text)
	r.tokens[id] += int(t.Count)
	r.logprobs[id] = append(r.logprobs[id], t.Logprobs...)
	r.order = append(r.order, id)
	hook := r.onToken
	r.mu.Unlock()
	if hook != nil {
		hook(id)
	}
	return nil
}

func (r *recorder) SendDone(id uint64, d infer.Done) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.done[id] = d
	return nil
}

func (r *recorder) SendError(id uint64, e infer.Error) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs[id] = e
	return nil
}

func (r *recorder) SendStats(transport.Stats) error { return nil }

func (r *recorder) Beat() { r.beats.Add(1) }

func (r *recorder) textOf(id uint64) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.text[id] == nil {
		return ""
	}
	return r.text[id].String()
}

// testLoop is a workerLoop over the demo model with a recorder for a ring.
func testLoop(t *testing.T, slots int, kvBudget int64) (*workerLoop, *recorder, chan inbound) {
	t.Helper()
	return testLoopOf(t, slots, kvBudget, loadTestModel(t))
}

// testLoopOf is a workerLoop over m, served as "demo", with a recorder for
// a ring.
func testLoopOf(t *testing.T, slots int, kvBudget int64, m Model) (*workerLoop, *recorder, chan inbound) {
	t.Helper()
	rec := newRecorder()
	w := newWorkerLoop(rec, slots, kvBudget, map[string]Model{"demo": m}, testLogger(t))
	t.Cleanup(w.closeAll)
	return w, rec, make(chan inbound, 64)
}

func submit(id uint64, s infer.Request) inbound {
	return inbound{typ: transport.FrameSubmit, id: id, submit: s}
}

// runUntilIdle runs rounds until no request is left, failing after limit.
func runUntilIdle(t *testing.T, w *workerLoop, inbox chan inbound, limit int) {
	t.Helper()
	for range limit {
		if len(w.byID) == 0 && len(inbox) == 0 {
			return
		}
		if err := w.round(inbox); err != nil {
			t.Fatal(err)
		}
	}
	t.Fatalf("still %d requests after %d rounds", len(w.byID), limit)
}

// batchSubmits are prompts of different lengths, greedy and seeded
// sampling, with and without stop strings, logprobs and top logprobs.
func batchSubmits() []infer.Request {
	long := strings.Repeat("The gateway hands requests to workers. ", 12)
	return []infer.Request{
		{Model: "demo", Prompt: "The ", MaxTokens: 60},
		{Model: "demo", Prompt: long, MaxTokens: 80, Logprobs: true, TopLogprobs: 5},
		{Model: "demo", Prompt: "A worker ", MaxTokens: 70, Temperature: 0.9, TopP: 0.9, Seed: 5, HasSeed: true, Logprobs: true},
		{Model: "demo", Prompt: "Q", MaxTokens: 40, Temperature: 1.2, Seed: 11, HasSeed: true},
		{Model: "demo", Messages: []infer.ChatMessage{{Role: "user", Content: "tokens and batches"}}, MaxTokens: 50,
			Logprobs: true, TopLogprobs: infer.MaxTopLogprobs},
		{Model: "demo", Prompt: long[:150], MaxTokens: 90, Temperature: 0.7, TopP: 0.5, Seed: 99, HasSeed: true, Stop: []string{"e t"},
			Logprobs: true, TopLogprobs: 2},
		{Model: "demo", Prompt: "In", MaxTokens: 100},
		{Model: "demo", Prompt: "streams ", MaxTokens: 30, Temperature: 1, Seed: 3, HasSeed: true, Logprobs: true, TopLogprobs: 1},
	}
}

// Every request batched with others, some joining while others are half
// done, produces exactly the text it produces alone.
func TestBatchedMatchesAlone(t *testing.T) {
	checkBatchedMatchesAlone(t, loadTestModel(t), batchSubmits())
}

// samplingSubmits mix every sampling parameter, each row its own set and
// seed, with rows that set none.
func samplingSubmits() []infer.Request {
	long := strings.Repeat("The gateway hands requests to workers. ", 12)
	// The demo model's tokens are bytes.
	bias := func(b byte, v float32) infer.LogitBias { return infer.LogitBias{Token: uint32(b), Bias: v} }
	return []infer.Request{
		{Model: "demo", Prompt: "The gateway ", MaxTokens: 60, RepetitionPenalty: 1.3, Logprobs: true, TopLogprobs: 3},
		{Model: "demo", Prompt: long, MaxTokens: 80, Temperature: 0.9, TopK: 5, PresencePenalty: 0.6, Seed: 5, HasSeed: true},
		{Model: "demo", Prompt: "A worker ", MaxTokens: 70, Temperature: 1.2, MinP: 0.1, TopP: 0.9, FrequencyPenalty: 0.4, Seed: 11, HasSeed: true,
			Logprobs: true},
		{Model: "demo", Prompt: "In", MaxTokens: 50, LogitBias: []infer.LogitBias{bias(' ', -2), bias('e', -5)}, Logprobs: true, TopLogprobs: 4},
		{Model: "demo", Messages: []infer.ChatMessage{{Role: "user", Content: "tokens and batches"}}, MaxTokens: 60,
			Temperature: 1, TopK: 20, MinP: 0.05, TopP: 0.95, RepetitionPenalty: 1.1, PresencePenalty: 0.2, FrequencyPenalty: 0.2,
			LogitBias: []infer.LogitBias{bias('a', 1.5), bias('t', -1)}, Seed: 3, HasSeed: true, Logprobs: true, TopLogprobs: infer.MaxTopLogprobs},
		{Model: "demo", Prompt: "The ", MaxTokens: 60},
		{Model: "demo", Prompt: long[:150], MaxTokens: 90, Temperature: 0.7, TopP: 0.5, Seed: 99, HasSeed: true, Stop: []string{"e t"}},
		{Model: "demo", Prompt: "streams ", MaxTokens: 40, Temperature: 1.5, TopK: 1, FrequencyPenalty: 1, Seed: 7, HasSeed: true,
			Logprobs: true, TopLogprobs: 1},
	}
}

// Rows whose sampling parameters differ, each changing its own copy of
// the batch's logits, still make exactly the text each makes alone.
func TestBatchedSamplingMatchesAlone(t *testing.T) {
	m := loadTestModel(t)
	subs := samplingSubmits()
	// Each row's parameters change its text, or the batch would not show
	// that they stay with their row.
	for i, s := range subs {
		plain := s
		plain.TopK, plain.MinP, plain.PresencePenalty, plain.FrequencyPenalty, plain.RepetitionPenalty, plain.LogitBias = 0, 0, 0, 0, 0, nil
		if reflect.DeepEqual(plain, s) {
			continue
		}
		with, _, err := Generate(context.Background(), m, &s)
		if err != nil {
			t.Fatal(err)
		}
		without, _, err := Generate(context.Background(), m, &plain)
		if err != nil {
			t.Fatal(err)
		}
		if with == without {
			t.Errorf("request %d: its sampling parameters left the text %q as it was", i, with)
		}
	}
	checkBatchedMatchesAlone(t, m, subs)
}

// checkBatchedMatchesAlone runs subs in one batch, three at once and the
// rest joining a few steps apart, and checks that each makes the text,
// counts and logprobs it makes alone.
func checkBatchedMatchesAlone(t *testing.T, m Model, subs []infer.Request) {
	t.Helper()
	want := make([]string, len(subs))
	wantDone := make([]infer.Done, len(subs))
	wantLogprobs := make([][]infer.TokenLogprob, len(subs))
	for i := range subs {
		var text strings.Builder
		var err error
		wantDone[i], err = generate(context.Background(), m, &subs[i], func(tok infer.Token) {
			text.WriteString(tok.Text)
			wantLogprobs[i] = append(wantLogprobs[i], tok.Logprobs...)
		})
		if err != nil {
			t.Fatal(err)
		}
		want[i] = text.String()
		checkLogprobs(t, fmt.Sprintf("request %d alone", i), &subs[i], wantLogprobs[i], wantDone[i])
	}
	w, rec, inbox := testLoop(t, len(subs), workerconf.DefaultKVCacheBytes)
	// Three arrive together; the rest join one by one, a few steps apart,
	// while the batch is running.
	for i := range 3 {
		inbox <- submit(uint64(i), subs[i])
	}
	widest := 0
	for i := 3; i < len(subs); i++ {
		for range 7 {
			if err := w.round(inbox); err != nil {
				t.Fatal(err)
			}
			widest = max(widest, len(w.batches[0].rows))
		}
		inbox <- submit(uint64(i), subs[i])
	}
	runUntilIdle(t, w, inbox, 1000)
	if widest < 4 {
		t.Errorf("batches reached %d rows, want the requests to overlap", widest)
	}
	for i := range subs {
		id := uint64(i)
		if e, ok := rec.errs[id]; ok {
			t.Fatalf("request %d: error %+v", i, e)
		}
		if got := rec.textOf(id); got != want[i] || rec.done[id] != wantDone[i] {
			t.Errorf("request %d %q:\nbatched %q %+v\nalone   %q %+v", i, subs[i].Prompt, got, rec.done[id], want[i], wantDone[i])
		}
		if err := sameLogprobs(rec.logprobs[id], wantLogprobs[i]); err != nil {
			t.Errorf("request %d %q: batched and alone: %v", i, subs[i].Prompt, err)
		}
	}
	if b := w.batches[0]; len(b.rows) != 0 {
		t.Errorf("idle batch holds %d rows", len(b.rows))
	}
}

// batchLogitsDiffer bounds how far a row's logits in a batch may be from
// its logits alone: the batch's shapes change the order in which ONNX
// Runtime sums, and so the last bits of the float32 results (ort's
// TestBatchRowsMatchAloneLogits holds them to the same bound). A
// log-softmax moves by at most twice as much.
const batchLogitsDiffer = 1e-4

// sameLogprobs reports how got and want, the entries of the same tokens
// batched and alone, differ by more than the batch's rounding can
// explain: the same tokens, logprobs within twice batchLogitsDiffer, and
// the same top tokens but for those that tie within that much, which
// may trade places (or the last place).
func sameLogprobs(got, want []infer.TokenLogprob) error {
	const tol = 2 * batchLogitsDiffer
	near := func(a, b float32) bool { return math.Abs(float64(a)-float64(b)) <= tol }
	if len(got) != len(want) {
		return fmt.Errorf("%d entries, want %d", len(got), len(want))
	}
	for i := range got {
		g, w := got[i], want[i]
		if g.Token != w.Token || !near(g.Logprob, w.Logprob) || len(g.Top) != len(w.Top) {
			return fmt.Errorf("token %d: got %+v, want %+v", i, g, w)
		}
		for j, top := range g.Top {
			// The j-th largest logprob moves no more than any one does.
			if !near(top.Logprob, w.Top[j].Logprob) {
				return fmt.Errorf("token %d: top entry %d is %+v, want %+v", i, j, top, w.Top[j])
			}
			if top.Token == w.Top[j].Token {
				continue
			}
			k := slices.IndexFunc(w.Top, func(x infer.TopLogprob) bool { return x.Token == top.Token })
			if k < 0 && !near(top.Logprob, w.Top[len(w.Top)-1].Logprob) || k >= 0 && !near(top.Logprob, w.Top[k].Logprob) {
				return fmt.Errorf("token %d: top entry %d is %+v, want %+v in %+v", i, j, top, w.Top[j], w.Top)
			}
		}
	}
	return nil
}

// checkLogprobs checks the logprob entries of s's tokens: one per token
// when s asks for them, each with the top entries asked for, most likely
// first, and none otherwise.
func checkLogprobs(t *testing.T, what string, s *infer.Request, got []infer.TokenLogprob, done infer.Done) {
	t.Helper()
	if !s.Logprobs {
		if got != nil {
			t.Errorf("%s: %d logprob entries, none asked for", what, len(got))
		}
		return
	}
	if len(got) != int(done.CompletionTokens) {
		t.Fatalf("%s: %d logprob entries for %d tokens", what, len(got), done.CompletionTokens)
	}
	for i, e := range got {
		if len(e.Top) != int(s.TopLogprobs) || !(e.Logprob <= 0) {
			t.Fatalf("token %d of %s: %+v, want a logprob <= 0 and %d top entries", i, what, e, s.TopLogprobs)
		}
		for j := 1; j < len(e.Top); j++ {
			if e.Top[j].Logprob > e.Top[j-1].Logprob {
				t.Fatalf("token %d of %s: top entries %+v not most likely first", i, what, e.Top)
			}
		}
		if len(e.Top) > 0 && e.Logprob > e.Top[0].Logprob {
			t.Fatalf("token %d of %s: logprob %v above the most likely one's %+v", i, what, e.Logprob, e.Top[0])
		}
		if s.Temperature == 0 && len(e.Top) > 0 && (e.Token != e.Top[0].Token || e.Logprob != e.Top[0].Logprob) {
			t.Fatalf("token %d of %s: greedy chose %+v, not the most likely %+v", i, what, e, e.Top[0])
		}
	}
}

// A cancel that arrives while a step is in flight stops the sequence
// before that step's token is sent, and frees its slot for a waiting
// request at the next step.
func TestCancelWithinOneStep(t *testing.T) {
	w, rec, inbox := testLoop(t, 2, workerconf.DefaultKVCacheBytes)
	long := infer.Request{Model: "demo", Prompt: "The ", Temperature: 1, Seed: 1, HasSeed: true}
	requireLong(t, loadTestModel(t), &long)
	inbox <- submit(1, long)
	inbox <- submit(2, infer.Request{Model: "demo", Prompt: "A ", MaxTokens: 200})
	// The cancel lands in the inbox just after request 1's fifth token was
	// sent, that is during the step that computes its sixth.
	const before = 5
	rec.onToken = func(id uint64) {
		if id == 1 && rec.tokens[1] == before {
			inbox <- inbound{typ: transport.FrameCancel, id: 1}
		}
	}
	for range 20 {
		if err := w.round(inbox); err != nil {
			t.Fatal(err)
		}
	}
	if got := rec.tokens[1]; got > before+1 {
		t.Errorf("request 1 sent %d tokens, cancelled after %d: want at most one more", got, before)
	} else {
		t.Logf("tokens after cancel: %d", got-before)
	}
	if w.byID[1] != nil || len(w.batches[0].rows) != 1 {
		t.Fatalf("after cancel: %d rows, request 1 known %v", len(w.batches[0].rows), w.byID[1] != nil)
	}
	// The freed slot takes a new request, which runs beside request 2.
	inbox <- submit(3, infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 5})
	if err := w.round(inbox); err != nil {
		t.Fatal(err)
	}
	if n := len(w.batches[0].rows); n != 2 {
		t.Errorf("after a new submit: %d rows, want 2", n)
	}
	runUntilIdle(t, w, inbox, 1000)
	if d, ok := rec.done[3]; !ok || d.CompletionTokens != 5 {
		t.Errorf("request 3: done %+v, %v", d, ok)
	}
	if _, ok := rec.done[1]; ok {
		t.Error("the cancelled request was answered with done")
	}
}

// When KV memory is short, waiting requests start most urgent first, in
// arrival order within an urgency, and a running sequence keeps its place.
func TestUrgentTakesNextFreeSlot(t *testing.T) {
	m := loadTestModel(t)
	s := func(u priority.Urgency, tokens uint32) infer.Request {
		return infer.Request{Model: "demo", Prompt: "The ", MaxTokens: tokens, Urgency: u, Class: priority.DefaultClasses.Of(u)}
	}
	// Room for exactly two rows of 4 + 40 tokens.
	budget := m.KVBytes(2, 4+40)
	w, rec, inbox := testLoop(t, 8, budget)
	inbox <- submit(1, s(6, 40))
	inbox <- submit(2, s(6, 40))
	if err := w.round(inbox); err != nil {
		t.Fatal(err)
	}
	if n := len(w.batches[0].rows); n != 2 {
		t.Fatalf("%d rows running, want 2", n)
	}
	// Arrival order 3..7 with urgencies 7, 6, 0, 3, 0.
	for _, q := range []struct {
		id uint64
		u  priority.Urgency
	}{{3, 7}, {4, 6}, {5, 0}, {6, 3}, {7, 0}} {
		inbox <- submit(q.id, s(q.u, 40))
	}
	var started []uint64
	rec.onToken = func(id uint64) {
		if rec.tokens[id] == 1 {
			started = append(started, id)
		}
	}
	runUntilIdle(t, w, inbox, 2000)
	if want := []uint64{5, 7, 6, 4, 3}; fmt.Sprint(started) != fmt.Sprint(want) {
		t.Errorf("waiting requests started in order %v, want %v", started, want)
	}
	for id := uint64(1); id <= 7; id++ {
		if d := rec.done[id]; d.CompletionTokens != 40 {
			t.Errorf("request %d: done %+v", id, d)
		}
	}
}

func TestRequestOverKVBudgetRefused(t *testing.T) {
	m := loadTestModel(t)
	w, rec, inbox := testLoopOf(t, 4, m.KVBytes(1, 100), m)
	inbox <- submit(1, infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 500})
	runUntilIdle(t, w, inbox, 10)
	if e := rec.errs[1]; e.Code != infer.CodeInvalidRequest || !strings.Contains(e.Message, "budget") {
		t.Errorf("got %+v, want a budget error", e)
	}
}

// A logit_bias token past the model's vocabulary, which only the prefill
// reveals, ends its request with an invalid_request error, as a refusal
// at admission would; the worker goes on serving the others.
func TestLoopBiasPastVocabulary(t *testing.T) {
	models := map[string]struct {
		m     Model
		token uint32
		says  string
	}{
		"demo":      {loadTestModel(t), 257, "logit_bias: token 257 is not in model demo's vocabulary of 257 tokens"},
		"synthetic": {newSynthetic("synthetic", 0), 1, "logit_bias: token 1 is not in model synthetic's vocabulary of 1 tokens"},
	}
	for name, tc := range models {
		t.Run(name, func(t *testing.T) {
			w, rec, inbox := testLoopOf(t, 2, workerconf.DefaultKVCacheBytes, tc.m)
			inbox <- submit(1, infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 5,
				LogitBias: []infer.LogitBias{{Token: 0, Bias: 1}, {Token: tc.token, Bias: 1}}})
			inbox <- submit(2, infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 5,
				LogitBias: []infer.LogitBias{{Token: tc.token - 1, Bias: 1}}})
			runUntilIdle(t, w, inbox, 100)
			if e := rec.errs[1]; e.Code != infer.CodeInvalidRequest || e.Message != tc.says {
				t.Errorf("request 1: got %+v, want %s %q", e, infer.CodeInvalidRequest, tc.says)
			}
			if n := rec.tokens[1]; n != 0 {
				t.Errorf("request 1 sent %d tokens before its error", n)
			}
			if d, ok := rec.done[2]; !ok || d.CompletionTokens != 5 {
				t.Errorf("request 2: done %+v, error %+v", d, rec.errs[2])
			}
			if w.stats.SequencesStarted != 2 || w.stats.SequencesFinished != 2 || len(w.byID) != 0 {
				t.Errorf("stats %+v, %d requests left", w.stats, len(w.byID))
			}
		})
	}
}
