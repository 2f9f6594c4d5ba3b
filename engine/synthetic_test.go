package engine

import (
	"strings"
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/workerconf"
)

// The synthetic model runs in the loop that serves real models: each token
// is SyntheticToken, a request runs to its max_tokens (no token ends it,
// ignore_eos or not), its prompt tokens are its words, and its context is
// 1<<20 tokens.
func TestSyntheticThroughTheLoop(t *testing.T) {
	w, rec, inbox := testLoopOf(t, 4, workerconf.DefaultKVCacheBytes, newSynthetic("demo", 0))
	reqs := map[uint64]infer.Request{
		1: {Model: "demo", Prompt: "one two  three", MaxTokens: 5},
		2: {Model: "demo", Messages: []infer.ChatMessage{{Role: "system", Content: "be brief"}, {Role: "user", Content: "a b c"}}, MaxTokens: 3, IgnoreEOS: true},
		3: {Model: "demo", Prompt: "x", MaxTokens: 40, Temperature: 1.3, TopP: 0.5},
	}
	for id, r := range reqs {
		inbox <- submit(id, r)
	}
	runUntilIdle(t, w, inbox, 100)
	for id, want := range map[uint64]infer.Done{
		1: {FinishReason: infer.FinishLength, PromptTokens: 3, CompletionTokens: 5},
		2: {FinishReason: infer.FinishLength, PromptTokens: 5, CompletionTokens: 3},
		3: {FinishReason: infer.FinishLength, PromptTokens: 1, CompletionTokens: 40},
	} {
		if got := rec.done[id]; got != want {
			t.Errorf("request %d: done %+v, want %+v", id, got, want)
		}
		if got, want := rec.textOf(id), strings.Repeat(SyntheticToken, int(want.CompletionTokens)); got != want {
			t.Errorf("request %d: text %q, want %q", id, got, want)
		}
	}
	if got := newSynthetic("demo", 0).Info().ContextLength; got != 1<<20 {
		t.Errorf("context length %d, want %d", got, 1<<20)
	}
	// The context bounds a request that names no max_tokens.
	inbox <- submit(4, infer.Request{Model: "demo", Prompt: strings.Repeat("w ", 1<<20)})
	runUntilIdle(t, w, inbox, 10)
	if e := rec.errs[4]; e.Code != infer.CodeContextLength {
		t.Errorf("a prompt of the whole context: got %+v, want %s", e, infer.CodeContextLength)
	}
}

// A paced synthetic model gives no sequence two tokens less than its
// interval apart, and a sequence's first token comes at once.
func TestSyntheticPacing(t *testing.T) {
	const interval = 20 * time.Millisecond
	w, rec, inbox := testLoopOf(t, 4, workerconf.DefaultKVCacheBytes, newSynthetic("demo", interval))
	sent := map[uint64][]time.Time{}
	rec.onToken = func(id uint64) { sent[id] = append(sent[id], time.Now()) }
	start := time.Now()
	inbox <- submit(1, infer.Request{Model: "demo", Prompt: "a", MaxTokens: 6})
	if err := w.round(inbox); err != nil {
		t.Fatal(err)
	}
	// A second sequence joins the running batch one step later.
	inbox <- submit(2, infer.Request{Model: "demo", Prompt: "b", MaxTokens: 4})
	runUntilIdle(t, w, inbox, 100)
	if first := sent[1][0].Sub(start); first > interval/2 {
		t.Errorf("first token after %s, want it at once", first)
	}
	for id, times := range sent {
		for i := 1; i < len(times); i++ {
			if gap := times[i].Sub(times[i-1]); gap < interval-time.Millisecond {
				t.Errorf("request %d: tokens %d and %d %s apart, want at least %s", id, i-1, i, gap, interval)
			}
		}
	}
	if len(sent[1]) != 6 || len(sent[2]) != 4 {
		t.Errorf("sent %d and %d tokens, want 6 and 4", len(sent[1]), len(sent[2]))
	}
}

// A worker whose settings name the synthetic model serves it without
// loading anything, over the ring.
func TestRunSynthetic(t *testing.T) {
	rw := startRingWorkerSpec(t, 2, workerconf.Model{Name: "demo", Dir: "synthetic:1ms"}, 0)
	c, err := rw.end.Open(1, &infer.Request{Model: "demo", Prompt: "The gateway", MaxTokens: 7})
	if err != nil {
		t.Fatal(err)
	}
	got := collect(t, c)
	if got.done == nil || got.text != strings.Repeat(SyntheticToken, 7) || got.done.PromptTokens != 2 {
		t.Errorf("got %q %+v, want 7 synthetic tokens after a prompt of 2", got.text, got.done)
	}
}
