package backend

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"h3infer/infer"
	"h3infer/internal/onnxgen"
	"h3infer/priority"
	"h3infer/transport"
)

// recorder is the ring side of a workerLoop driven in process: it keeps
// every frame the loop sends, in order.
type recorder struct {
	mu     sync.Mutex
	text   map[uint64]*strings.Builder
	tokens map[uint64]int
	done   map[uint64]infer.Done
	errs   map[uint64]infer.Error
	order  []uint64 // request id of every token frame, in sending order
	// onToken, when set, runs in the loop's goroutine after each token is
	// recorded; tests use it to act at an exact point of the stream.
	onToken func(id uint64)
	beats   atomic.Uint64 // heartbeats the loop has counted
}

func newRecorder() *recorder {
	return &recorder{
		text:   map[uint64]*strings.Builder{},
		tokens: map[uint64]int{},
		done:   map[uint64]infer.Done{},
		errs:   map[uint64]infer.Error{},
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
	m := loadTestModel(t)
	rec := newRecorder()
	w := newWorkerLoop(rec, slots, kvBudget, map[string]*Model{"demo": m}, testLogger(t))
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
// sampling, with and without stop strings.
func batchSubmits() []infer.Request {
	long := strings.Repeat("The gateway hands requests to workers. ", 12)
	return []infer.Request{
		{Model: "demo", Prompt: "The ", MaxTokens: 60},
		{Model: "demo", Prompt: long, MaxTokens: 80},
		{Model: "demo", Prompt: "A worker ", MaxTokens: 70, Temperature: 0.9, TopP: 0.9, Seed: 5, HasSeed: true},
		{Model: "demo", Prompt: "Q", MaxTokens: 40, Temperature: 1.2, Seed: 11, HasSeed: true},
		{Model: "demo", Messages: []infer.ChatMessage{{Role: "user", Content: "tokens and batches"}}, MaxTokens: 50},
		{Model: "demo", Prompt: long[:150], MaxTokens: 90, Temperature: 0.7, TopP: 0.5, Seed: 99, HasSeed: true, Stop: []string{"e t"}},
		{Model: "demo", Prompt: "In", MaxTokens: 100},
		{Model: "demo", Prompt: "streams ", MaxTokens: 30, Temperature: 1, Seed: 3, HasSeed: true},
	}
}

// Every request batched with others, some joining while others are half
// done, produces exactly the text it produces alone.
func TestBatchedMatchesAlone(t *testing.T) {
	m := loadTestModel(t)
	subs := batchSubmits()
	want := make([]string, len(subs))
	wantDone := make([]infer.Done, len(subs))
	for i := range subs {
		var err error
		if want[i], wantDone[i], err = m.Generate(context.Background(), &subs[i]); err != nil {
			t.Fatal(err)
		}
	}
	w, rec, inbox := testLoop(t, len(subs), DefaultKVCacheBytes)
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
	}
	if b := w.batches[0]; len(b.rows) != 0 || b.cols != 0 {
		t.Errorf("idle batch holds %d rows, %d columns", len(b.rows), b.cols)
	}
}

// A cancel that arrives while a step is in flight stops the sequence
// before that step's token is sent, and frees its slot for a waiting
// request at the next step.
func TestCancelWithinOneStep(t *testing.T) {
	w, rec, inbox := testLoop(t, 2, DefaultKVCacheBytes)
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
	budget := m.kvBytes(2, 4+40)
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
	w, rec, inbox := testLoop(t, 4, m.kvBytes(1, 100))
	inbox <- submit(1, infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 500})
	runUntilIdle(t, w, inbox, 10)
	if e := rec.errs[1]; e.Code != infer.CodeInvalidRequest || !strings.Contains(e.Message, "budget") {
		t.Errorf("got %+v, want a budget error", e)
	}
}

// loadRandomModel writes a small random-weight model into the test's
// temporary directory. Its attention is diffuse, unlike the demo model's,
// so a padding column that leaks into attention shows in the logits.
func loadRandomModel(t testing.TB, o onnxgen.Options) *Model {
	t.Helper()
	needModel(t)
	dir := t.TempDir()
	o.Random = true
	if err := onnxgen.Write(dir, o); err != nil {
		t.Fatal(err)
	}
	m, err := LoadModel(dir, ModelOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// Rows of different lengths that join and leave a batch at different steps
// get, at every step, the logits they get alone in a batch of one.
func TestBatchRowsMatchAloneLogits(t *testing.T) {
	for _, layout := range []string{onnxgen.KVCacheConcat, onnxgen.KVCacheAppend} {
		t.Run("kv_cache="+layout, func(t *testing.T) {
			m := loadRandomModel(t, onnxgen.Options{Layers: 2, Heads: 4, Hidden: 64, Context: 256, Seed: 7, KVCache: layout})
			testBatchRowsMatchAlone(t, m, nil)
		})
	}
}

// The append layout computes what the concat layout computes: the same
// weights in either graph give each row the same logits at every step,
// batched with rows that join and leave.
func TestAppendLayoutMatchesConcat(t *testing.T) {
	opts := onnxgen.Options{Layers: 2, Heads: 4, Hidden: 64, Context: 256, Seed: 7}
	concat := loadRandomModel(t, opts)
	opts.KVCache = onnxgen.KVCacheAppend
	testBatchRowsMatchAlone(t, loadRandomModel(t, opts), concat)
}

// testBatchRowsMatchAlone runs rows of different lengths through one batch
// of m, joining and leaving at different steps, and each alone in a batch
// of its own, of ref when it is set (else of m); at every step their
// logits must agree.
func testBatchRowsMatchAlone(t *testing.T, m, ref *Model) {
	if ref == nil {
		ref = m
	}
	type pair struct {
		batched, alone *generation
		solo           *batch
		steps          int // decode steps left
	}
	shared := m.newBatch()
	defer shared.close()
	var live []*pair
	join := func(prompt string, steps int) {
		ids := m.tok.encode(prompt)
		p := &pair{solo: ref.newBatch(), steps: steps}
		t.Cleanup(p.solo.close)
		for _, g := range []**generation{&p.batched, &p.alone} {
			*g = &generation{m: m, row: -1}
			if g == &p.alone {
				(*g).m = ref
			}
			kv, err := (*g).prefill0(ids)
			if err != nil {
				t.Fatal(err)
			}
			(*g).last = argmax((*g).logits)
			if g == &p.batched {
				shared.join(*g, kv)
			} else {
				p.solo.join(*g, kv)
			}
		}
		live = append(live, p)
	}
	arrivals := map[int][]struct {
		prompt string
		steps  int
	}{
		0:  {{"The gateway", 30}, {"x", 12}},
		3:  {{strings.Repeat("a long prompt ", 6), 10}},
		5:  {{"mid", 25}},
		14: {{"late arrival, longer than the rest so far: " + strings.Repeat("z", 60), 8}},
	}
	worst := 0.0
	for step := 0; step < 40; step++ {
		for _, a := range arrivals[step] {
			join(a.prompt, a.steps)
		}
		if len(live) == 0 {
			break
		}
		if err := shared.step(); err != nil {
			t.Fatal(err)
		}
		var keep []*pair
		for _, p := range live {
			if err := p.solo.step(); err != nil {
				t.Fatal(err)
			}
			d := maxAbsDiff(p.batched.logits, p.alone.logits)
			worst = max(worst, d)
			if d > 1e-4 {
				t.Fatalf("step %d: a row's logits differ from its run alone by %g", step, d)
			}
			p.batched.last = argmax(p.batched.logits)
			p.alone.last = p.batched.last
			if p.steps--; p.steps == 0 {
				shared.leave(p.batched)
				continue
			}
			keep = append(keep, p)
		}
		live = keep
	}
	t.Logf("largest logit difference, batched against alone: %g", worst)
	if len(shared.rows) != 0 || shared.cols != 0 {
		t.Errorf("emptied batch keeps %d rows, %d columns", len(shared.rows), shared.cols)
	}
}
