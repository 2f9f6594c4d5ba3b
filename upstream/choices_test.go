package upstream

import (
	"io"
	"net/http"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"

	"h3infer/infer"
)

// A request for several choices goes upstream with n, and each choice's
// tokens come back under its index, interleaved as the upstream sends
// them, each choice's end as it comes; tokens of two choices never run
// together, even when their events arrive in one write.
func TestChoicesForwarded(t *testing.T) {
	f, url := newFake(t)
	s, _ := newTestSet(t, Options{}, testConfig("a", url))
	var body atomic.Value
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		body.Store(string(b))
		sseStart(w)
		var all strings.Builder
		for _, c := range []string{
			`{"choices":[{"index":1,"delta":{"role":"assistant","content":""}},{"index":0,"delta":{"role":"assistant","content":""}}]}`,
			`{"choices":[{"index":0,"delta":{"content":"a"}}]}`,
			`{"choices":[{"index":1,"delta":{"content":"b"}}]}`,
			`{"choices":[{"index":1,"delta":{"content":"c"}}]}`,
			`{"choices":[{"index":1,"delta":{},"finish_reason":"stop"}]}`,
			`{"choices":[{"index":0,"delta":{"content":"d"}}]}`,
			`{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}`,
			`{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":4}}`,
		} {
			all.WriteString("data: " + c + "\n\n")
		}
		io.WriteString(w, all.String()+"data: [DONE]\n\n")
	})
	req := chatRequest("m")
	req.N = 2
	evs := run(t, s, req)
	if !strings.Contains(body.Load().(string), `"n":2`) {
		t.Errorf("request upstream: %s, want n 2", body.Load())
	}
	var got []infer.Token
	for _, ev := range evs[:len(evs)-1] {
		got = append(got, ev.Token)
	}
	want := []infer.Token{
		{Index: 0, Count: 1, Text: "a"},
		{Index: 1, Count: 2, Text: "bc", FinishReason: "stop"},
		{Index: 0, Count: 1, Text: "d", FinishReason: "length"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("tokens %+v,\nwant %+v", got, want)
	}
	if d := last(t, evs).Done; d == nil || *d != (infer.Done{FinishReason: "length", PromptTokens: 5, CompletionTokens: 4}) {
		t.Errorf("ended with %+v, want done: choice 0's finish, the upstream's usage", last(t, evs))
	}
	// A request for one choice never sees an index, nor an end before
	// its Done.
	req.N = 1
	f.answer(streamTokens("x", "y"))
	for _, ev := range run(t, s, req) {
		if ev.Token.Index != 0 || ev.Token.FinishReason != "" {
			t.Errorf("one choice: token %+v", ev.Token)
		}
	}
}

// A choice index the request did not ask for is a malformed stream.
func TestChoicesOutOfRange(t *testing.T) {
	f, url := newFake(t)
	s, _ := newTestSet(t, Options{}, testConfig("a", url))
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		sseStart(w)
		sseData(w, `{"choices":[{"index":2,"delta":{"content":"x"}}]}`)
		sseData(w, "[DONE]")
	})
	for _, n := range []uint32{1, 2} {
		req := chatRequest("m")
		req.N = n
		evs := run(t, s, req)
		if e := last(t, evs).Err; len(evs) != 1 || e == nil || e.Code != infer.CodeUpstreamLost {
			t.Errorf("n %d: events %+v, want only upstream_lost", n, evs)
		}
	}
}

// Tokens that arrive together go on together, but never more than
// maxHeldTokens in one event: an upstream that always has the next event
// at hand cannot make one event grow without end.
func TestHeldTokensBounded(t *testing.T) {
	f, url := newFake(t)
	s, _ := newTestSet(t, Options{}, testConfig("a", url))
	tokens := make([]string, 3*maxHeldTokens)
	for i := range tokens {
		tokens[i] = "x"
	}
	f.answer(streamTokensTogether(tokens...))
	req := chatRequest("m")
	req.MaxTokens = uint32(len(tokens))
	evs := run(t, s, req)
	var n uint32
	for _, ev := range evs {
		if ev.Token.Count > maxHeldTokens {
			t.Errorf("an event of %d tokens, more than %d", ev.Token.Count, maxHeldTokens)
		}
		n += ev.Token.Count
	}
	if n != uint32(len(tokens)) || len(evs) < 4 {
		t.Errorf("%d tokens in %d events, want %d in at least 4", n, len(evs), len(tokens))
	}
}
