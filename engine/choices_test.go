package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/priority"
	"h3infer/transport"
	"h3infer/workerconf"
)

// choicesResult is what a call for several choices delivered, by choice.
type choicesResult struct {
	text     []strings.Builder
	tokens   []uint32
	logprobs [][]infer.TokenLogprob
	reasons  []string
	late     int // tokens of a choice after its finish reason
	done     *infer.Done
	err      *infer.Error
}

func collectChoices(t *testing.T, c *transport.Call, n int) *choicesResult {
	t.Helper()
	r := &choicesResult{text: make([]strings.Builder, n), tokens: make([]uint32, n), logprobs: make([][]infer.TokenLogprob, n), reasons: make([]string, n)}
	for ev := range c.Events() {
		switch {
		case ev.Done != nil:
			r.done = ev.Done
		case ev.Err != nil:
			r.err = ev.Err
		default:
			i := ev.Token.Index
			if int(i) >= n {
				t.Fatalf("token of choice %d in a request for %d", i, n)
			}
			if r.reasons[i] != "" {
				r.late++
			}
			r.text[i].WriteString(ev.Token.Text)
			r.tokens[i] += ev.Token.Count
			r.logprobs[i] = append(r.logprobs[i], ev.Token.Logprobs...)
			r.reasons[i] = ev.Token.FinishReason
		}
	}
	return r
}

// A request for n choices, over the real ring, is prefilled once (the
// worker's counters say so, where n separate requests count n), and each
// choice i is the text the same request with one choice and the seed
// infer.ChoiceSeed(seed, i) makes alone: sampled on its own, with its own
// stop strings, limit and logprobs. The Done counts the prompt once and
// every choice's tokens.
func TestChoicesSharePrefill(t *testing.T) {
	rw := startRingWorker(t, 4)
	m := loadTestModel(t)
	const n = 4
	s := infer.Request{Model: "demo", Prompt: "The gateway hands requests to workers, ", MaxTokens: 40,
		Temperature: 1, Seed: 42, HasSeed: true, Stop: []string{"e t"}, Logprobs: true, TopLogprobs: 2, N: n}
	c, err := rw.end.Open(1, &s)
	if err != nil {
		t.Fatal(err)
	}
	got := collectChoices(t, c, n)
	if got.err != nil || got.done == nil {
		t.Fatalf("got error %+v, done %+v", got.err, got.done)
	}
	if got.late != 0 {
		t.Errorf("%d tokens came after their choice's finish reason", got.late)
	}
	var sum uint32
	texts := map[string]bool{}
	for i := range n {
		alone := s
		alone.N, alone.Seed = 0, infer.ChoiceSeed(s.Seed, i)
		want, wantDone, err := Generate(context.Background(), m, &alone)
		if err != nil {
			t.Fatal(err)
		}
		if g := got.text[i].String(); g != want || got.reasons[i] != wantDone.FinishReason || got.tokens[i] != wantDone.CompletionTokens {
			t.Errorf("choice %d: %q (%s, %d tokens), alone %q (%s, %d tokens)", i, g, got.reasons[i], got.tokens[i], want, wantDone.FinishReason, wantDone.CompletionTokens)
		}
		if len(got.logprobs[i]) != int(got.tokens[i]) {
			t.Errorf("choice %d: %d logprob entries for %d tokens", i, len(got.logprobs[i]), got.tokens[i])
		}
		if i == 0 && got.done.FinishReason != wantDone.FinishReason {
			t.Errorf("done finish_reason %q, choice 0's %q", got.done.FinishReason, wantDone.FinishReason)
		}
		if got.done.PromptTokens != wantDone.PromptTokens {
			t.Errorf("done counts %d prompt tokens, the prompt has %d", got.done.PromptTokens, wantDone.PromptTokens)
		}
		sum += got.tokens[i]
		texts[got.text[i].String()] = true
	}
	if got.done.CompletionTokens != sum {
		t.Errorf("done counts %d completion tokens, the choices %d", got.done.CompletionTokens, sum)
	}
	if len(texts) < 2 {
		t.Errorf("all %d seeded choices sampled the same text %q", n, got.text[0].String())
	}
	st := rw.waitStats(t, func(s transport.Stats) bool { return s.SequencesFinished == 1 && s.Active == 0 })
	if st.Prefills != 1 || st.PrefillTokens != uint64(got.done.PromptTokens) {
		t.Errorf("%d choices: %d prefills of %d tokens, want 1 of %d", n, st.Prefills, st.PrefillTokens, got.done.PromptTokens)
	}

	// The same prompt asked n times apart is prefilled n times.
	alone := s
	alone.N = 0
	for i := range n {
		c, err := rw.end.Open(uint64(10+i), &alone)
		if err != nil {
			t.Fatal(err)
		}
		if r := collect(t, c); r.done == nil {
			t.Fatalf("request %d: %+v", i, r)
		}
	}
	st = rw.waitStats(t, func(s transport.Stats) bool { return s.SequencesFinished == 1+n && s.Active == 0 })
	if st.Prefills != 1+n {
		t.Errorf("after %d separate requests: %d prefills, want %d", n, st.Prefills, 1+n)
	}
}

// Greedy choices are all the same text; constrained ones each a whole
// document of the schema, each the one its seed makes alone: every
// choice has a matcher of its own.
func TestChoicesGreedyAndFormat(t *testing.T) {
	rw := startRingWorker(t, 4)
	m := loadTestModel(t)
	schema := `{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","properties":{"n":{"type":"integer"},"ok":{"type":"boolean"}},"required":["n","ok"],"additionalProperties":false}}}`
	for _, tc := range []struct {
		name string
		s    infer.Request
	}{
		{"greedy", infer.Request{Model: "demo", Prompt: "In", MaxTokens: 30, N: 3}},
		{"json_schema", infer.Request{Model: "demo", Prompt: "A worker ", MaxTokens: 60, Temperature: 1, Seed: 7, HasSeed: true,
			ResponseFormat: schema, N: 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := rw.end.Open(uint64(len(tc.name)), &tc.s)
			if err != nil {
				t.Fatal(err)
			}
			got := collectChoices(t, c, 3)
			if got.err != nil || got.done == nil {
				t.Fatalf("got error %+v, done %+v", got.err, got.done)
			}
			docs := map[string]bool{}
			for i := range 3 {
				text := got.text[i].String()
				docs[text] = true
				if tc.s.ResponseFormat == "" {
					if text != got.text[0].String() {
						t.Errorf("greedy choice %d %q differs from choice 0 %q", i, text, got.text[0].String())
					}
					continue
				}
				var doc struct {
					N  *json.Number
					OK *bool
				}
				if err := json.Unmarshal([]byte(text), &doc); got.reasons[i] != infer.FinishStop || err != nil || doc.N == nil || doc.OK == nil {
					t.Errorf("choice %d: %q (%s, %v); want a whole document with n and ok", i, text, got.reasons[i], err)
				}
				alone := tc.s
				alone.N, alone.Seed = 0, infer.ChoiceSeed(tc.s.Seed, i)
				if want, _, err := Generate(context.Background(), m, &alone); err != nil || text != want {
					t.Errorf("choice %d: %q, alone %q (%v)", i, text, want, err)
				}
			}
			if tc.s.ResponseFormat != "" && len(docs) < 2 {
				t.Errorf("3 seeded choices wrote the same document %q", got.text[0].String())
			}
		})
	}
}

// A worker refuses more choices than it has slots, and more than its KV
// budget holds, naming n; the slots a request for n choices holds count
// n against the next request.
func TestChoicesBounded(t *testing.T) {
	m := loadTestModel(t)
	w, rec, inbox := testLoopOf(t, 4, m.KVBytes(2, 30), m)
	inbox <- submit(1, infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 20, N: 5})
	inbox <- submit(2, infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 20, N: 3})
	runUntilIdle(t, w, inbox, 10)
	for id, want := range map[uint64]string{1: "n: 5 choices need 5 slots", 2: "n: 3 choices"} {
		if e := rec.errs[id]; e.Code != infer.CodeInvalidRequest || !strings.HasPrefix(e.Message, want) {
			t.Errorf("request %d: got %+v, want an invalid_request starting %q", id, e, want)
		}
	}

	w, rec, inbox = testLoopOf(t, 4, workerconf.DefaultKVCacheBytes, m)
	inbox <- submit(1, infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 50, N: 3})
	inbox <- submit(2, infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 5, N: 2})
	inbox <- submit(3, infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 5})
	runUntilIdle(t, w, inbox, 1000)
	if e, ok := rec.errs[2]; !ok || !strings.Contains(e.Message, "slots") {
		t.Errorf("request 2 for 2 choices beside 3 on 4 slots: got %+v, want busy", e)
	}
	for _, id := range []uint64{1, 3} {
		if _, ok := rec.done[id]; !ok {
			t.Errorf("request %d was not answered: %+v", id, rec.errs[id])
		}
	}
	if d := rec.done[1]; d.CompletionTokens != 3*50 {
		t.Errorf("request 1: done %+v, want 150 completion tokens", d)
	}
}

// Cancelling a request for several choices drops every one of its rows
// at once, and nothing of it is sent afterwards.
func TestChoicesCancel(t *testing.T) {
	w, rec, inbox := testLoop(t, 4, workerconf.DefaultKVCacheBytes)
	long := infer.Request{Model: "demo", Prompt: "The ", Temperature: 1, Seed: 1, HasSeed: true, MaxTokens: 200, IgnoreEOS: true, N: 3}
	inbox <- submit(1, long)
	inbox <- submit(2, infer.Request{Model: "demo", Prompt: "A ", MaxTokens: 30})
	for range 5 {
		if err := w.round(inbox); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(w.batches[0].rows); n != 4 {
		t.Fatalf("%d rows running, want 3 choices and 1 other", n)
	}
	sent := rec.tokens[1]
	inbox <- inbound{typ: transport.FrameCancel, id: 1}
	runUntilIdle(t, w, inbox, 1000)
	if rec.tokens[1] != sent {
		t.Errorf("%d tokens after the cancel", rec.tokens[1]-sent)
	}
	if _, ok := rec.done[1]; ok {
		t.Error("the cancelled request was answered with done")
	}
	if d := rec.done[2]; d.CompletionTokens == 0 {
		t.Errorf("the other request: done %+v", d)
	}
	if len(w.batches[0].rows) != 0 || len(w.byID) != 0 {
		t.Errorf("after the cancel: %d rows, %d requests", len(w.batches[0].rows), len(w.byID))
	}
}

// ChoiceSeed keeps choice 0's seed, so that it is the answer with one
// choice, and gives the others seeds that differ.
func TestChoiceSeed(t *testing.T) {
	seen := map[uint64]string{}
	for _, seed := range []uint64{0, 1, 2, 42, 1 << 63} {
		if infer.ChoiceSeed(seed, 0) != seed {
			t.Errorf("ChoiceSeed(%d, 0) = %d", seed, infer.ChoiceSeed(seed, 0))
		}
		for i := 1; i < infer.MaxChoices; i++ {
			v := infer.ChoiceSeed(seed, i)
			who := fmt.Sprintf("(%d, %d)", seed, i)
			if prev, dup := seen[v]; dup {
				t.Errorf("ChoiceSeed%s = ChoiceSeed%s", who, prev)
			}
			seen[v] = who
		}
	}
}

// choiceRecorder is a recorder that also keeps each choice's text.
type choiceRecorder struct {
	*recorder
	byChoice map[[2]uint64]*strings.Builder // request id, choice
}

func (r *choiceRecorder) SendToken(id uint64, t infer.Token) error {
	r.mu.Lock()
	k := [2]uint64{id, uint64(t.Index)}
	if r.byChoice[k] == nil {
		r.byChoice[k] = &strings.Builder{}
	}
	r.byChoice[k].WriteString(t.Text)
	r.mu.Unlock()
	return r.recorder.SendToken(id, t)
}

func (r *choiceRecorder) SendTokens(ts []transport.TokenOut) error {
	for _, t := range ts {
		if err := r.SendToken(t.ID, t.Token); err != nil {
			return err
		}
	}
	return nil
}

func (r *choiceRecorder) choice(id uint64, i int) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if b := r.byChoice[[2]uint64{id, uint64(i)}]; b != nil {
		return b.String()
	}
	return ""
}

// An urgent request for several choices that arrives while a bulk step
// runs aside is prefilled beside it, once, and its choices join the
// batch after the step: each makes the text it makes alone.
func TestChoicesUrgentBesideBulkStep(t *testing.T) {
	m := loadTestModel(t)
	rec := &choiceRecorder{recorder: newRecorder(), byChoice: map[[2]uint64]*strings.Builder{}}
	w := newWorkerLoop(rec, 8, workerconf.DefaultKVCacheBytes, map[string]Model{"demo": m}, testLogger(t))
	t.Cleanup(w.closeAll)
	inbox := make(chan inbound, 64)
	var gate func(func())
	w.bulk, gate = gatedLane(t)
	w.asideMin, w.inlineMax = 0, 0
	bulk := infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 40, Urgency: 6, Class: priority.Bulk}
	urgent := infer.Request{Model: "demo", Prompt: "An urgent ", MaxTokens: 20, Temperature: 1, Seed: 9, HasSeed: true,
		Urgency: 0, Class: priority.Urgent, N: 3}
	inbox <- submit(1, bulk)
	for range 3 {
		if err := w.round(inbox); err != nil {
			t.Fatal(err)
		}
	}
	gate(func() {
		inbox <- submit(2, urgent)
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			// The first token of each of the 3 choices.
			rec.mu.Lock()
			started := rec.tokens[2] >= 3
			rec.mu.Unlock()
			if started {
				return
			}
			time.Sleep(time.Millisecond)
		}
	})
	if err := w.round(inbox); err != nil {
		t.Fatal(err)
	}
	if n := len(w.batches[0].rows); n != 4 {
		t.Errorf("after the step: %d rows, want the bulk one and 3 choices", n)
	}
	runUntilIdle(t, w, inbox, 1000)
	if w.stats.Prefills != 2 {
		t.Errorf("%d prefills for one request and one of 3 choices, want 2", w.stats.Prefills)
	}
	for i := range 3 {
		alone := urgent
		alone.N, alone.Seed = 0, infer.ChoiceSeed(urgent.Seed, i)
		want, _, err := Generate(context.Background(), m, &alone)
		if err != nil {
			t.Fatal(err)
		}
		if got := rec.choice(2, i); got != want {
			t.Errorf("choice %d: beside the bulk step %q, alone %q", i, got, want)
		}
	}
	if d := rec.done[2]; d.CompletionTokens == 0 {
		t.Errorf("urgent request: done %+v", d)
	}
}
