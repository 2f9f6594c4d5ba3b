package upstream

import (
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"h3infer/config"
	"h3infer/infer"
	"h3infer/priority"
)

func TestStream(t *testing.T) {
	f, url := newFake(t)
	s, reg := newTestSet(t, Options{}, testConfig("a", url))

	f.answer(streamTokens("Hel", "lo"))
	evs := run(t, s, chatRequest("m"))
	if got := text(evs); got != "Hello" {
		t.Errorf("text: got %q, want %q", got, "Hello")
	}
	// The role-only chunk emits nothing; tokens that arrived together
	// may go on as one event.
	if n := tokenCount(evs); n != 2 || len(evs) < 2 || len(evs) > 3 {
		t.Errorf("events: got %d carrying %d tokens, want 2 tokens in one or two events and done: %+v", len(evs), n, evs)
	}
	want := infer.Done{FinishReason: "length", PromptTokens: 5, CompletionTokens: 2}
	if d := last(t, evs).Done; d == nil || *d != want {
		t.Errorf("done: got %+v, want %+v", last(t, evs), want)
	}

	// Completions: choices[0].text, and no usage: the tokens counted.
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/completions" {
			http.Error(w, "wrong endpoint "+r.URL.Path, http.StatusBadRequest)
			return
		}
		sseStart(w)
		for _, tok := range []string{"a", "", "b", "c"} {
			sseData(w, `{"choices":[{"index":0,"text":"`+tok+`","finish_reason":null}]}`)
		}
		sseData(w, `{"choices":[{"index":0,"text":"","finish_reason":"stop"}]}`)
		sseData(w, "[DONE]")
	})
	evs = run(t, s, &infer.Request{Model: "m", Prompt: "x"})
	if got := text(evs); got != "abc" {
		t.Errorf("completion text: got %q, want abc", got)
	}
	want = infer.Done{FinishReason: "stop", CompletionTokens: 3}
	if d := last(t, evs).Done; d == nil || *d != want {
		t.Errorf("completion done: got %+v, want %+v", last(t, evs), want)
	}
	if got := counter(t, reg, "h3infer_upstream_requests_total", "upstream", "a", "outcome", "ok"); got != 2 {
		t.Errorf("requests_total{ok}: got %v, want 2", got)
	}
}

func TestRequestSent(t *testing.T) {
	const (
		traceID  = "4bf92f3577b34da6a3ce929d0e0e4736"
		parentID = "00f067aa0ba902b7"
	)
	for _, tc := range []struct {
		mapping  string
		urgency  uint8
		priority any // nil: no field
	}{
		{PriorityOff, 2, nil},
		{PriorityLowerFirst, 2, 2.0},
		{PriorityHigherFirst, 2, 5.0},
		{PriorityHigherFirst, 7, 0.0},
	} {
		t.Run(tc.mapping+"/u"+string(rune('0'+tc.urgency)), func(t *testing.T) {
			f, url := newFake(t)
			cred := filepath.Join(t.TempDir(), "token")
			if err := os.WriteFile(cred, []byte("  upstream-secret\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			spans := tracetest.NewSpanRecorder()
			tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
			cfg := testConfig("a", url)
			cfg.Priority, cfg.CredentialFile = tc.mapping, cred
			s, _ := newTestSet(t, Options{TracerProvider: tp}, cfg)

			type seen struct {
				header http.Header
				body   map[string]any
			}
			got := make(chan seen, 1)
			f.answer(func(w http.ResponseWriter, r *http.Request) {
				var body map[string]any
				if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
					t.Errorf("request body: %v", err)
				}
				got <- seen{r.Header.Clone(), body}
				streamTokens("x")(w, r)
			})
			req := chatRequest("m@7")
			req.Urgency = priority.Urgency(tc.urgency)
			req.Seed, req.HasSeed = 42, true
			req.TraceParent = "00-" + traceID + "-" + parentID + "-01"
			if d := last(t, run(t, s, req)).Done; d == nil {
				t.Fatal("request did not finish")
			}
			r := <-got
			b := r.body
			if b["model"] != "m" {
				t.Errorf("model: got %v, want m (the @version stripped)", b["model"])
			}
			if p, ok := b["priority"]; tc.priority == nil && ok || tc.priority != nil && p != tc.priority {
				t.Errorf("priority: got %v (present %v), want %v", p, ok, tc.priority)
			}
			if b["stream"] != true || b["max_tokens"] != 16.0 || b["seed"] != 42.0 || b["temperature"] != 0.0 {
				t.Errorf("body: got %v; want stream, max_tokens 16, seed 42, temperature 0", b)
			}
			if so, _ := b["stream_options"].(map[string]any); so["include_usage"] != true {
				t.Errorf("stream_options: got %v, want include_usage", b["stream_options"])
			}
			for _, k := range []string{"top_p", "ignore_eos", "prompt", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "response_format"} {
				if _, ok := b[k]; ok {
					t.Errorf("body has %q; want it left out: %v", k, b)
				}
			}
			if msgs, _ := b["messages"].([]any); len(msgs) != 1 {
				t.Errorf("messages: got %v", b["messages"])
			}
			if got, want := r.header.Get("Priority"), "u="+string(rune('0'+tc.urgency)); got != want {
				t.Errorf("Priority header: got %q, want %q", got, want)
			}
			if got := r.header.Values("Authorization"); len(got) != 1 || got[0] != "Bearer upstream-secret" {
				t.Errorf("Authorization: got %q, want the configured credential, trimmed", got)
			}
			ended := spans.Ended()
			if len(ended) != 1 {
				t.Fatalf("spans: got %d, want 1", len(ended))
			}
			sp := ended[0]
			if sp.Name() != "upstream" || sp.Parent().SpanID().String() != parentID || sp.SpanContext().TraceID().String() != traceID {
				t.Errorf("span %q: parent %s trace %s; want \"upstream\", a child of %s in %s", sp.Name(), sp.Parent().SpanID(), sp.SpanContext().TraceID(), parentID, traceID)
			}
			wantTP := "00-" + traceID + "-" + sp.SpanContext().SpanID().String() + "-01"
			if got := r.header.Get("Traceparent"); got != wantTP {
				t.Errorf("traceparent: got %q, want %q (the upstream span)", got, wantTP)
			}
			wantPrio := "off"
			if tc.priority != nil {
				wantPrio = string(rune('0' + int(tc.priority.(float64))))
			}
			var prio string
			for _, kv := range sp.Attributes() {
				if kv.Key == "h3infer.upstream.priority" {
					prio = kv.Value.AsString()
				}
			}
			if prio != wantPrio {
				t.Errorf("span priority: got %q, want %q", prio, wantPrio)
			}
		})
	}
}

// TestSamplingParametersSent: what the client asked of the sampler goes
// upstream under the names vLLM, SGLang and h3infer read.
func TestSamplingParametersSent(t *testing.T) {
	f, url := newFake(t)
	s, _ := newTestSet(t, Options{}, testConfig("a", url))
	got := make(chan map[string]any, 1)
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		var body map[string]any
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			t.Errorf("request body: %v", err)
		}
		got <- body
		streamTokens("x")(w, r)
	})
	req := chatRequest("m")
	req.TopK, req.MinP = 40, 0.25
	req.PresencePenalty, req.FrequencyPenalty, req.RepetitionPenalty = -0.5, 1.5, 1.25
	req.LogitBias = []infer.LogitBias{{Token: 7, Bias: -100}, {Token: 50256, Bias: 2.5}}
	req.ResponseFormat = `{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","properties":{},"additionalProperties":false}}}`
	if d := last(t, run(t, s, req)).Done; d == nil {
		t.Fatal("request did not finish")
	}
	b := <-got
	for k, want := range map[string]any{
		"top_k": 40.0, "min_p": 0.25, "presence_penalty": -0.5, "frequency_penalty": 1.5, "repetition_penalty": 1.25,
		"logit_bias": map[string]any{"7": -100.0, "50256": 2.5},
		"response_format": map[string]any{"type": "json_schema", "json_schema": map[string]any{"name": "x",
			"schema": map[string]any{"type": "object", "properties": map[string]any{}, "additionalProperties": false}}},
	} {
		if !reflect.DeepEqual(b[k], want) {
			t.Errorf("%s: got %v, want %v", k, b[k], want)
		}
	}
}

// Logprobs go upstream in each route's shape and come back as the
// request's: chat's entries with their bytes (a token that is half a
// UTF-8 character keeps its bytes), a text completion's parallel lists
// with the alternatives put most likely first, each cut to the count
// asked for, and the tokens counted by their logprobs.
func TestLogprobsPassThrough(t *testing.T) {
	f, url := newFake(t)
	s, _ := newTestSet(t, Options{}, testConfig("a", url))
	var body atomic.Value
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		body.Store(string(b))
		sseStart(w)
		if strings.HasSuffix(r.URL.Path, "/chat/completions") {
			// Two tokens in one chunk, the first the lead byte of "é".
			sseData(w, `{"choices":[{"index":0,"delta":{"content":"\u00e9"},"logprobs":{"content":[`+
				`{"token":"\ufffd","logprob":-0.5,"bytes":[195],"top_logprobs":[{"token":"x","logprob":-0.5,"bytes":[120]},{"token":"y","logprob":-1},{"token":"z","logprob":-2}]},`+
				`{"token":"\ufffd","logprob":-0.25,"bytes":[169],"top_logprobs":[]}]}}]}`)
			sseData(w, `{"choices":[{"index":0,"delta":{},"finish_reason":"stop","logprobs":{"content":[{"token":"!","logprob":-3,"top_logprobs":[]}]}}]}`)
		} else {
			sseData(w, `{"choices":[{"index":0,"text":" a","logprobs":{"tokens":[" a"],"token_logprobs":[-1.5],"top_logprobs":[{" c":-3," a":-1.5," b":-2}],"text_offset":[0]}}]}`)
			sseData(w, `{"choices":[{"index":0,"text":"","finish_reason":"length","logprobs":null}]}`)
		}
		sseData(w, "[DONE]")
	})

	req := chatRequest("m")
	req.Logprobs, req.TopLogprobs = true, 2
	evs := run(t, s, req)
	if !strings.Contains(body.Load().(string), `"logprobs":true,"top_logprobs":2`) {
		t.Errorf("chat request upstream: %s, want logprobs true and top_logprobs 2", body.Load())
	}
	var lps []infer.TokenLogprob
	var n uint32
	for _, ev := range evs {
		lps, n = append(lps, ev.Token.Logprobs...), n+ev.Token.Count
	}
	want := []infer.TokenLogprob{
		{Token: "\xc3", Logprob: -0.5, Top: []infer.TopLogprob{{Token: "x", Logprob: -0.5}, {Token: "y", Logprob: -1}}},
		{Token: "\xa9", Logprob: -0.25, Top: []infer.TopLogprob{}},
		{Token: "!", Logprob: -3, Top: []infer.TopLogprob{}},
	}
	if !reflect.DeepEqual(lps, want) || n != 3 || text(evs) != "é" {
		t.Errorf("chat: got %d tokens %q with logprobs %+v,\nwant 3 \"é\" with %+v", n, text(evs), lps, want)
	}
	if d := last(t, evs).Done; d == nil || d.CompletionTokens != 3 {
		t.Errorf("chat: ended with %+v, want done after 3 tokens", last(t, evs))
	}

	req = &infer.Request{Model: "m", Prompt: "hi", MaxTokens: 1, Logprobs: true, TopLogprobs: 2}
	evs = run(t, s, req)
	if !strings.Contains(body.Load().(string), `"logprobs":2`) || strings.Contains(body.Load().(string), "top_logprobs") {
		t.Errorf("completion request upstream: %s, want logprobs 2 alone", body.Load())
	}
	lps = nil
	for _, ev := range evs {
		lps = append(lps, ev.Token.Logprobs...)
	}
	want = []infer.TokenLogprob{{Token: " a", Logprob: -1.5, Top: []infer.TopLogprob{{Token: " a", Logprob: -1.5}, {Token: " b", Logprob: -2}}}}
	if !reflect.DeepEqual(lps, want) {
		t.Errorf("completion: got logprobs %+v, want %+v", lps, want)
	}
}

// An upstream that answers text without the logprobs asked for (it
// ignored the parameter) ends the request with a 400's code saying so,
// rather than an answer without them; a hostile one's malformed or
// oversized logprobs are a malformed stream. Neither is taken as a token.
func TestLogprobsMissingOrHostile(t *testing.T) {
	f, url := newFake(t)
	s, reg := newTestSet(t, Options{}, testConfig("a", url))
	var answer atomic.Value
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		sseStart(w)
		sseData(w, answer.Load().(string))
		sseData(w, "[DONE]")
	})
	huge := `{"choices":[{"delta":{"content":"x"},"logprobs":{"content":[` + strings.Repeat(`{"token":"","logprob":0},`, maxChunkLogprobs) + `{"token":"","logprob":0}]}}]}`
	for _, tc := range []struct{ chunk, code, msg string }{
		{`{"choices":[{"delta":{"content":"x"}}]}`, infer.CodeInvalidRequest, "logprobs: the upstream server did not return them"},
		{`{"choices":[{"delta":{"content":"x"},"logprobs":{"content":[{"token":"x","logprob":0.5}]}}]}`, infer.CodeUpstreamLost, ""},
		{`{"choices":[{"delta":{"content":"x"},"logprobs":{"content":[{"token":"x","logprob":-1,"bytes":[300]}]}}]}`, infer.CodeUpstreamLost, ""},
		{`{"choices":[{"delta":{"content":"x"},"logprobs":{"content":[{"token":"x"}]}}]}`, infer.CodeUpstreamLost, ""},
		{`{"choices":[{"delta":{"content":"x"},"logprobs":"no"}]}`, infer.CodeUpstreamLost, ""},
		{huge, infer.CodeUpstreamLost, ""},
	} {
		answer.Store(tc.chunk)
		req := chatRequest("m")
		req.Logprobs = true
		evs := run(t, s, req)
		e := last(t, evs).Err
		if e == nil || e.Code != tc.code || tc.msg != "" && e.Message != tc.msg || len(evs) != 1 {
			t.Errorf("%.80s: events %+v, want only an error %s %q", tc.chunk, evs, tc.code, tc.msg)
		}
	}
	if got := counter(t, reg, "h3infer_upstream_errors_total", "upstream", "a", "kind", kindMalformed); got != 6 {
		t.Errorf("errors_total{malformed}: got %v, want 6", got)
	}
}

func TestCredentialFileRefused(t *testing.T) {
	_, url := newFake(t)
	cred := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(cred, []byte("secret"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig("a", url)
	cfg.CredentialFile = cred
	_, err := NewSet([]Config{cfg}, Options{})
	if err == nil || !strings.Contains(err.Error(), "upstreams[0].credential_file") || !strings.Contains(err.Error(), "0644") {
		t.Fatalf("NewSet with a world-readable credential: got %v, want an error naming upstreams[0].credential_file", err)
	}

	// From the environment: only the variable named, through LookupEnv.
	cfg.CredentialFile, cfg.CredentialEnv = "", "UPSTREAM_TOKEN"
	env := func(k string) (string, bool) {
		if k == "UPSTREAM_TOKEN" {
			return "from-env", true
		}
		return "", false
	}
	s, _ := newTestSet(t, Options{LookupEnv: env}, cfg)
	if got := only(t, s, "m").mat.credential; got != "from-env" {
		t.Errorf("credential: got %q, want from-env", got)
	}
	cfg.CredentialEnv = "UNSET"
	if _, err := NewSet([]Config{cfg}, Options{LookupEnv: env}); err == nil || !strings.Contains(err.Error(), "upstreams[0].credential_env") {
		t.Errorf("NewSet with an unset variable: got %v, want an error naming credential_env", err)
	}
}

func TestRefusals(t *testing.T) {
	long := strings.Repeat("é", 5000)
	for _, tc := range []struct {
		name       string
		status     int
		header     map[string]string
		body       string
		code       string
		unstarted  bool
		retryAfter time.Duration
		kind       string
		message    string // a part of the message the client sees
	}{
		{"429", 429, map[string]string{"Retry-After": "7"}, `{"error":{"message":"slow down"}}`, infer.CodeRateLimited, true, 7 * time.Second, kindRateLimited, ""},
		{"429 huge retry", 429, map[string]string{"Retry-After": "999999"}, ``, infer.CodeRateLimited, true, time.Hour, kindRateLimited, ""},
		{"503", 503, map[string]string{"Retry-After": "2"}, `busy`, infer.CodeOverloaded, true, 2 * time.Second, kindOverloaded, ""},
		{"404 model", 404, nil, `{"error":{"message":"The model ` + "`m`" + ` does not exist."}}`, infer.CodeModelNotFound, true, 0, kindModelNotFound, ""},
		{"400", 400, nil, `{"object":"error","message":"temperature must be positive","code":400}`, infer.CodeInvalidRequest, false, 0, kindInvalid, "temperature must be positive"},
		{"400 long", 400, nil, `{"error":{"message":"` + long + `"}}`, infer.CodeInvalidRequest, false, 0, kindInvalid, "éé"},
		{"400 context", 400, nil, `{"object":"error","message":"This model's maximum context length is 4096 tokens."}`, infer.CodeContextLength, false, 0, kindInvalid, "maximum context length"},
		{"422", 422, nil, `{"detail":"field required"}`, infer.CodeInvalidRequest, false, 0, kindInvalid, "field required"},
		{"401", 401, nil, `{"error":{"message":"bad key"}}`, infer.CodeUpstreamLost, true, 0, kindAuth, ""},
		{"500", 500, nil, `oops`, infer.CodeUpstreamLost, true, 0, kindStatus, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, url := newFake(t)
			s, reg := newTestSet(t, Options{}, testConfig("a", url))
			f.answer(func(w http.ResponseWriter, r *http.Request) {
				for k, v := range tc.header {
					w.Header().Set(k, v)
				}
				w.WriteHeader(tc.status)
				io.WriteString(w, tc.body)
			})
			evs := run(t, s, chatRequest("m"))
			if len(evs) != 1 || evs[0].Err == nil {
				t.Fatalf("events: got %+v, want one error", evs)
			}
			e := evs[0].Err
			if e.Code != tc.code || e.Unstarted != tc.unstarted || e.RetryAfter != tc.retryAfter {
				t.Errorf("error: got %+v, want code %s unstarted %v retry after %s", e, tc.code, tc.unstarted, tc.retryAfter)
			}
			if !strings.Contains(e.Message, tc.message) || len(e.Message) > maxMessage+4 {
				t.Errorf("message: got %q (%d bytes), want it to hold %q and be at most ~%d bytes", e.Message, len(e.Message), tc.message, maxMessage)
			}
			if got := counter(t, reg, "h3infer_upstream_errors_total", "upstream", "a", "kind", tc.kind); got != 1 {
				t.Errorf("errors_total{kind=%s}: got %v, want 1", tc.kind, got)
			}
		})
	}
}

func TestRetryAfterDate(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	if got := retryAfter(now.Add(90*time.Second).Format(http.TimeFormat), now); got != 90*time.Second {
		t.Errorf("HTTP date: got %s, want 1m30s", got)
	}
	if got := retryAfter(now.Add(-time.Minute).Format(http.TimeFormat), now); got != 0 {
		t.Errorf("past date: got %s, want 0", got)
	}
	if got := retryAfter("soon", now); got != 0 {
		t.Errorf("garbage: got %s, want 0", got)
	}
}

// TestBrokenStreams: after the first token every failure is an explicit
// error event, never a silent close; before it, the request may move.
func TestBrokenStreams(t *testing.T) {
	firstToken := func(w http.ResponseWriter) {
		sseStart(w)
		sseData(w, chatChunk("tok"))
	}
	for _, tc := range []struct {
		name      string
		handler   http.HandlerFunc
		code      string
		unstarted bool
		kind      string
	}{
		{"malformed json", func(w http.ResponseWriter, r *http.Request) {
			firstToken(w)
			sseData(w, `{"choices":[{"delta":`)
		}, infer.CodeUpstreamLost, false, kindMalformed},
		{"huge line", func(w http.ResponseWriter, r *http.Request) {
			firstToken(w)
			io.WriteString(w, "data: "+strings.Repeat("x", 2<<20)+"\n\n")
		}, infer.CodeUpstreamLost, false, kindMalformed},
		{"no done", func(w http.ResponseWriter, r *http.Request) {
			firstToken(w)
			sseData(w, `{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}`)
		}, infer.CodeUpstreamLost, false, kindStream},
		{"reset", func(w http.ResponseWriter, r *http.Request) {
			firstToken(w)
			panic(http.ErrAbortHandler)
		}, infer.CodeUpstreamLost, false, kindStream},
		{"stall mid-stream", func(w http.ResponseWriter, r *http.Request) {
			firstToken(w)
			<-r.Context().Done()
		}, infer.CodeTimeout, false, kindStall},
		{"error event", func(w http.ResponseWriter, r *http.Request) {
			firstToken(w)
			sseData(w, `{"error":{"message":"too long","type":"BadRequestError","code":"context_length_exceeded"}}`)
		}, infer.CodeContextLength, false, kindUpstreamError},
		{"stall before headers", func(w http.ResponseWriter, r *http.Request) {
			<-r.Context().Done()
		}, infer.CodeTimeout, true, kindStall},
		{"stall before first token", func(w http.ResponseWriter, r *http.Request) {
			sseStart(w)
			<-r.Context().Done()
		}, infer.CodeTimeout, true, kindStall},
		{"reset before headers", func(w http.ResponseWriter, r *http.Request) {
			panic(http.ErrAbortHandler)
		}, infer.CodeUpstreamLost, true, kindConnect},
		{"not an event stream", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"choices":[]}`)
		}, infer.CodeUpstreamLost, true, kindMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, url := newFake(t)
			s, reg := newTestSet(t, Options{}, testConfig("a", url))
			f.answer(tc.handler)
			start := time.Now()
			evs := run(t, s, chatRequest("m"))
			e := last(t, evs).Err
			if e == nil || e.Code != tc.code || e.Unstarted != tc.unstarted {
				t.Fatalf("last event: got %+v (error %+v), want error %s unstarted %v", last(t, evs), e, tc.code, tc.unstarted)
			}
			if wantTokens := map[bool]int{false: 1, true: 0}[tc.unstarted]; len(evs)-1 != wantTokens {
				t.Errorf("tokens before the error: got %d, want %d", len(evs)-1, wantTokens)
			}
			if time.Since(start) > 2*time.Second {
				t.Errorf("took %s; the stall timeout is 300ms", time.Since(start))
			}
			if got := counter(t, reg, "h3infer_upstream_errors_total", "upstream", "a", "kind", tc.kind); got != 1 {
				t.Errorf("errors_total{kind=%s}: got %v, want 1", tc.kind, got)
			}
		})
	}
}

func TestConnectionRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	s, _ := newTestSet(t, Options{}, testConfig("a", "http://"+addr))
	e := last(t, run(t, s, chatRequest("m"))).Err
	if e == nil || e.Code != infer.CodeUpstreamLost || !e.Unstarted {
		t.Fatalf("got %+v, want upstream_lost, unstarted", e)
	}
}

func TestCancel(t *testing.T) {
	f, url := newFake(t)
	cfg := testConfig("a", url)
	cfg.StallTimeout = config.Duration(time.Minute) // only Cancel may end it
	s, reg := newTestSet(t, Options{}, cfg)
	serverDone := make(chan struct{})
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		defer close(serverDone)
		sseStart(w)
		sseData(w, chatChunk("t"))
		// Nothing more: only a reset of the stream ends this.
		<-r.Context().Done()
	})
	c, err := only(t, s, "m").Open(1, chatRequest("m"))
	if err != nil {
		t.Fatal(err)
	}
	if ev := <-c.Events(); ev.Token.Text != "t" {
		t.Fatalf("first event: got %+v, want a token", ev)
	}
	c.Cancel()
	c.Cancel() // twice is fine
	for ev := range c.Events() {
		if ev.Done != nil || ev.Err != nil {
			t.Errorf("event after Cancel: got %+v, want none but buffered tokens", ev)
		}
	}
	select {
	case <-serverDone:
	case <-time.After(time.Second):
		t.Fatal("the upstream's request context did not end after Cancel")
	}
	eventually(t, "the call is counted as cancelled", func() bool {
		return counter(t, reg, "h3infer_upstream_cancelled_total", "upstream", "a") == 1
	})
	if got := counter(t, reg, "h3infer_upstream_in_flight_requests", "upstream", "a"); got != 0 {
		t.Errorf("in flight after cancel: got %v, want 0", got)
	}
}

func TestOverflow(t *testing.T) {
	f, url := newFake(t)
	s, _ := newTestSet(t, Options{CallBuffer: 2}, testConfig("a", url))
	// Apart, so that each is an event of its own and the buffer fills.
	f.answer(streamTokensApart(20*time.Millisecond, "a", "b", "c", "d", "e"))
	c, err := only(t, s, "m").Open(1, chatRequest("m"))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the buffer overflows", func() bool { return len(c.Events()) == 3 })
	evs := collect(t, c)
	if len(evs) != 3 || evs[2].Err == nil || evs[2].Err.Code != infer.CodeOverflow {
		t.Fatalf("events: got %+v, want 2 tokens and overflow", evs)
	}
}

func TestEjection(t *testing.T) {
	f, url := newFake(t)
	cfg := testConfig("a", url)
	cfg.EjectAfter = 3
	s, reg := newTestSet(t, Options{}, cfg)
	h := only(t, s, "m")
	if got := counter(t, reg, "h3infer_upstream_up", "upstream", "a"); got != 1 {
		t.Errorf("up gauge of a new upstream: got %v, want 1", got)
	}
	// The probe a new upstream sends at once brings an ejected upstream
	// back; let it answer before the failures, or a slow one lands after
	// the ejection and undoes it.
	eventually(t, "the first probe answers", h.probed.Load)
	var status atomic.Int64
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		if st := int(status.Load()); st != 200 {
			w.WriteHeader(st)
			return
		}
		streamTokens("ok")(w, r)
	})
	step := func(st int) {
		t.Helper()
		status.Store(int64(st))
		run(t, s, chatRequest("m"))
	}
	// Two failures, a success resets; two more and a 429 (which is not
	// the upstream failing) keep it up; the third in a row ejects it.
	for _, st := range []int{500, 502, 200, 500, 500, 429, 404} {
		step(st)
		if !h.Ready() {
			t.Fatalf("ejected after status %d; want up (failures so far %d)", st, h.status().ConsecutiveFailures)
		}
	}
	step(500)
	if h.Ready() {
		t.Fatal("still ready after eject_after consecutive failures")
	}
	if st := s.BackendStates().([]Status)[0]; st.State != StateEjected || st.ConsecutiveFailures != 3 || st.Errors[kindStatus] != 6 {
		t.Errorf("status: got %+v, want ejected after 3 failures, 6 of kind status (the 404 too)", st)
	}
	if got := counter(t, reg, "h3infer_upstream_up", "upstream", "a"); got != 0 {
		t.Errorf("up gauge: got %v, want 0", got)
	}
	if got := counter(t, reg, "h3infer_upstream_ejections_total", "upstream", "a"); got != 1 {
		t.Errorf("ejections: got %v, want 1", got)
	}
	// Ejected means not dispatched to, but still listed: the scheduler
	// knows the model has a backend that may come back.
	if len(s.Backends("m")) != 1 {
		t.Error("an ejected upstream vanished from Backends")
	}
}

func TestProbeEjectsAndRecovers(t *testing.T) {
	f, url := newFake(t)
	f.modelsDown.Store(true)
	cfg := testConfig("a", url)
	cfg.DiscoverInterval = config.Duration(20 * time.Millisecond)
	cfg.EjectAfter = 2
	s, reg := newTestSet(t, Options{}, cfg)
	h := only(t, s, "m")
	eventually(t, "failed probes eject the idle upstream", func() bool { return !h.Ready() })
	f.modelsDown.Store(false)
	eventually(t, "a successful probe brings it back", h.Ready)
	if got := counter(t, reg, "h3infer_upstream_up", "upstream", "a"); got != 1 {
		t.Errorf("up gauge: got %v, want 1", got)
	}
	if st := h.status(); st.State != StateUp || st.ConsecutiveFailures != 0 {
		t.Errorf("status: got %+v, want up with no failures", st)
	}
}

func TestDiscovery(t *testing.T) {
	f, url := newFake(t)
	models := `{"object":"list","data":[{"id":"m1","max_model_len":4096},{"id":"m2"},{"id":"m1"}]}`
	f.models.Store(&models)
	gate := make(chan struct{})
	f.modelsGate.Store(&gate)
	cfg := testConfig("a", url)
	cfg.Models = nil
	cfg.StallTimeout = config.Duration(5 * time.Second) // the gate holds the first probe
	s, _ := newTestSet(t, Options{}, cfg)

	eventually(t, "the first probe is asked", func() bool { return f.probes.Load() > 0 })
	if s.Ready() || len(s.Models()) != 0 {
		t.Fatalf("before the first answer: Ready %v, models %v; want not ready, none", s.Ready(), s.Models())
	}
	close(gate)
	eventually(t, "the set is ready", s.Ready)
	want := []infer.ModelInfo{{Name: "m1", ContextLength: 4096}, {Name: "m2"}}
	if got := s.Models(); len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("Models: got %+v, want %+v", got, want)
	}
	if len(s.Backends("m1@3")) != 1 || len(s.Backends("m2")) != 1 || len(s.Backends("m")) != 0 {
		t.Errorf("Backends: m1@3 %d, m2 %d, m %d; want 1, 1, 0", len(s.Backends("m1@3")), len(s.Backends("m2")), len(s.Backends("m")))
	}
	// An upstream that goes down does not make the set unready.
	f.modelsDown.Store(true)
	if !s.Ready() {
		t.Error("Ready went false")
	}
}

// TestConfiguredModelsLearnContext: listed models are served whatever the
// upstream lists, with the context length it reports.
func TestConfiguredModelsLearnContext(t *testing.T) {
	f, url := newFake(t)
	models := `{"data":[{"id":"m","max_model_len":8192},{"id":"other"}]}`
	f.models.Store(&models)
	s, _ := newTestSet(t, Options{}, testConfig("a", url))
	eventually(t, "the set is ready", s.Ready)
	if got := s.Models(); len(got) != 1 || got[0] != (infer.ModelInfo{Name: "m", ContextLength: 8192}) {
		t.Errorf("Models: got %+v, want m with 8192", got)
	}
}

func TestUpdate(t *testing.T) {
	f, url := newFake(t)
	s, _ := newTestSet(t, Options{FirstID: 100}, testConfig("a", url), testConfig("b", url))
	ha, hb := s.handles()[0], s.handles()[1]
	if ha.ID() != 100 || hb.ID() != 101 {
		t.Errorf("IDs: got %d, %d; want 100, 101", ha.ID(), hb.ID())
	}

	// A request in flight on b when b's config changes finishes there.
	release := make(chan struct{})
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		sseStart(w)
		sseData(w, chatChunk("x"))
		<-release
		sseData(w, `{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}`)
		sseData(w, "[DONE]")
	})
	cfgs := []Config{testConfig("a", url), testConfig("b", url), testConfig("c", url)}
	cfgs[1].StallTimeout = config.Duration(5 * time.Second)
	if err := s.Update(cfgs[:2]); err != nil {
		t.Fatal(err)
	}
	hb = s.handles()[1]
	inFlight, err := hb.Open(1, chatRequest("m"))
	if err != nil {
		t.Fatal(err)
	}
	if ev := <-inFlight.Events(); ev.Token.Text != "x" {
		t.Fatalf("first event: got %+v", ev)
	}

	cfgs[1].Slots = 8
	if err := s.Update(cfgs); err != nil {
		t.Fatal(err)
	}
	now := s.handles()
	if len(now) != 3 || now[0] != ha || now[1] == hb || now[2].cfg.Name != "c" {
		t.Fatalf("after update: got %v; want a kept, b replaced, c new", now)
	}
	if hb.Ready() || now[1].Slots() != 8 {
		t.Errorf("old b ready %v, new b slots %d; want not ready, 8", hb.Ready(), now[1].Slots())
	}
	close(release)
	if d := last(t, collect(t, inFlight)).Done; d == nil {
		t.Error("the request in flight on the replaced handle did not finish")
	}
	eventually(t, "the replaced handle is closed once idle", hb.closedNow)

	// Removal, and a bad list that changes nothing.
	if err := s.Update(cfgs[:1]); err != nil {
		t.Fatal(err)
	}
	if len(s.BackendStates().([]Status)) != 1 || len(s.Backends("m")) != 1 {
		t.Errorf("after removing b and c: got %d states", len(s.BackendStates().([]Status)))
	}
	if err := s.Update([]Config{testConfig("a", url), testConfig("a", url)}); err == nil {
		t.Error("Update with a duplicate name: got nil error")
	}
	if len(s.handles()) != 1 || s.handles()[0] != ha {
		t.Error("a refused Update changed the set")
	}
}

func TestValidate(t *testing.T) {
	ok := testConfig("a", "https://regional:8443")
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want []string
	}{
		{"valid", func(*Config) {}, nil},
		{"loopback http", func(c *Config) { c.URL = "http://127.0.0.1:8000" }, nil},
		{"no name", func(c *Config) { c.Name = "" }, []string{"upstreams[2].name:"}},
		{"bad name", func(c *Config) { c.Name = "a b" }, []string{"upstreams[2].name:"}},
		{"http remote", func(c *Config) { c.URL = "http://regional:8000" }, []string{"upstreams[2].url: http is allowed only"}},
		{"v1 suffix", func(c *Config) { c.URL = "https://regional/v1/" }, []string{"upstreams[2].url: must not end in /v1"}},
		{"user info", func(c *Config) { c.URL = "https://u:p@regional" }, []string{"upstreams[2].url:"}},
		{"h3 over http", func(c *Config) { c.URL, c.Protocol = "http://localhost:1", ProtocolH3 }, []string{"upstreams[2].url:"}},
		{"everything", func(c *Config) {
			c.Protocol, c.Slots, c.Timeout, c.StallTimeout, c.DiscoverInterval = "h1", -1, -1, -1, -1
			c.CertFile, c.CredentialFile, c.CredentialEnv, c.Priority, c.EjectAfter = "c.pem", "f", "E", "urgent", -2
			c.Models = []string{"m", "", "m@2", "m"}
		}, []string{
			"upstreams[2].protocol:", "upstreams[2].slots:", "upstreams[2].timeout:", "upstreams[2].stall_timeout:",
			"upstreams[2].discover_interval:", "upstreams[2].cert_file:", "upstreams[2].credential_file:",
			"upstreams[2].priority:", "upstreams[2].eject_after:", "upstreams[2].models[1]:", "upstreams[2].models[2]:", "upstreams[2].models[3]:",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ok
			tc.edit(&c)
			err := c.Validate("upstreams[2]")
			if len(tc.want) == 0 {
				if err != nil {
					t.Errorf("got %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("got nil, want errors naming %v", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}
	err := ValidateAll([]Config{ok, testConfig("b", "https://x"), ok})
	if err == nil || !strings.Contains(err.Error(), `upstreams[2].name: "a" is already the name of upstreams[0]`) {
		t.Errorf("duplicate names: got %v", err)
	}
}

func TestStrictDecode(t *testing.T) {
	var c Config
	dec := json.NewDecoder(strings.NewReader(`{"name":"a","url":"https://x","stall_timeout":"2s","bogus":1}`))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err == nil {
		t.Error("unknown key decoded without error")
	}
	if c.StallTimeout != config.Duration(2*time.Second) {
		t.Errorf("stall_timeout: got %s, want 2s", c.StallTimeout)
	}
}

func TestHTTP2AndHTTP3(t *testing.T) {
	cert, caFile := testCA(t)
	for _, tc := range []struct {
		protocol, proto string
		serve           func(*testing.T, tls.Certificate) (*fake, string)
	}{
		{ProtocolH2, "HTTP/2.0", newTLSFake},
		{ProtocolH3, "HTTP/3.0", newH3Fake},
	} {
		t.Run(tc.protocol, func(t *testing.T) {
			f, url := tc.serve(t, cert)
			var proto atomic.Value
			f.answer(func(w http.ResponseWriter, r *http.Request) {
				proto.Store(r.Proto)
				streamTokens("se", "cure")(w, r)
			})
			cfg := testConfig("a", url)
			cfg.Protocol, cfg.CAFile = tc.protocol, caFile
			cfg.StallTimeout = config.Duration(3 * time.Second) // a QUIC handshake under -race
			s, _ := newTestSet(t, Options{}, cfg)
			for range 2 { // the second reuses the connection
				evs := run(t, s, chatRequest("m"))
				if text(evs) != "secure" || last(t, evs).Done == nil {
					t.Fatalf("events: got %+v", evs)
				}
			}
			if got := proto.Load(); got != tc.proto {
				t.Errorf("protocol: got %v, want %s", got, tc.proto)
			}
		})
	}

	// Without the CA file the upstream's certificate is refused.
	_, url := newTLSFake(t, cert)
	s, _ := newTestSet(t, Options{}, testConfig("a", url))
	if e := last(t, run(t, s, chatRequest("m"))).Err; e == nil || e.Code != infer.CodeUpstreamLost {
		t.Errorf("unknown CA: got %+v, want upstream_lost", e)
	}
}

// tokenCount is the tokens evs carry.
func tokenCount(evs []infer.Event) uint32 {
	var n uint32
	for _, ev := range evs {
		n += ev.Token.Count
	}
	return n
}

// TestTokensArrivingTogetherGoOnAsOne: tokens an upstream wrote at once
// become one event carrying them all, so a coalescing upstream costs one
// event per write; tokens written apart stay apart, none held back for
// the next.
func TestTokensArrivingTogetherGoOnAsOne(t *testing.T) {
	f, url := newFake(t)
	s, _ := newTestSet(t, Options{}, testConfig("a", url))
	f.answer(streamTokensTogether("a", "b", "c", "d"))
	evs := run(t, s, chatRequest("m"))
	if len(evs) != 2 || evs[0].Token.Count != 4 || evs[0].Token.Text != "abcd" || evs[1].Done == nil {
		t.Errorf("four tokens in one write: got %+v, want one event of 4 tokens, then done", evs)
	}
	f.answer(streamTokensApart(30*time.Millisecond, "a", "b", "c"))
	evs = run(t, s, chatRequest("m"))
	if len(evs) != 4 || tokenCount(evs) != 3 || text(evs) != "abc" {
		t.Errorf("three tokens written apart: got %+v, want three events of one token, then done", evs)
	}
}
