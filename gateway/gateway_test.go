package gateway

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"h3infer/infer"
	"h3infer/priority"
	"h3infer/scheduler"
	"h3infer/tlsbind"
)

// fakeStream replays scripted events. Like a transport call, its channel is
// closed after a terminal event; a script without one leaves it open, as a
// worker still generating would.
type fakeStream struct {
	id     uint64
	events chan infer.Event
	once   sync.Once
	closed chan struct{}
}

func (s *fakeStream) ID() uint64                 { return s.id }
func (s *fakeStream) Events() <-chan infer.Event { return s.events }
func (s *fakeStream) Close()                     { s.once.Do(func() { close(s.closed) }) }

// fakeScheduler answers every request with the script its test installed and
// records what it was asked.
type fakeScheduler struct {
	mu      sync.Mutex
	script  func(r *scheduler.Request) ([]infer.Event, error)
	got     []scheduler.Request
	streams []*fakeStream
	nextID  atomic.Uint64
	hangUp  atomic.Bool // close every stream's channel after its script, terminal or not
}

// fakeAdmission decides as the scheduler does for a tenant with the
// default settings: the urgency asked for, in its default class.
func fakeAdmission(r *scheduler.Request) scheduler.Admission {
	return scheduler.Admission{Urgency: r.Urgency, Class: priority.DefaultClasses.Of(r.Urgency)}
}

func (f *fakeScheduler) Submit(ctx context.Context, r *scheduler.Request) (Dispatch, scheduler.Admission, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.got = append(f.got, *r)
	adm := fakeAdmission(r)
	evs, err := f.script(r)
	if err != nil {
		return nil, adm, err
	}
	st := &fakeStream{id: f.nextID.Add(1), events: make(chan infer.Event, len(evs)), closed: make(chan struct{})}
	terminal := false
	for _, ev := range evs {
		st.events <- ev
		terminal = ev.Done != nil || ev.Err != nil
	}
	if terminal || f.hangUp.Load() {
		close(st.events)
	}
	f.streams = append(f.streams, st)
	return st, adm, nil
}

func (f *fakeScheduler) setScript(s func(r *scheduler.Request) ([]infer.Event, error)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.script = s
}

func (f *fakeScheduler) last() (scheduler.Request, *fakeStream) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.got) == 0 {
		return scheduler.Request{}, nil
	}
	var st *fakeStream
	if len(f.streams) > 0 {
		st = f.streams[len(f.streams)-1]
	}
	return f.got[len(f.got)-1], st
}

type fakeCatalog struct {
	ready atomic.Bool
}

func (c *fakeCatalog) Models() []infer.ModelInfo {
	if !c.ready.Load() {
		return nil
	}
	return []infer.ModelInfo{{Name: "demo", ContextLength: 512}, {Name: "org/other", ContextLength: 512}}
}

func (c *fakeCatalog) Ready() bool { return c.ready.Load() }

// workerState is what the test catalog reports of each backend, shaped as
// the worker pool's status is on /debug/state.
type workerState struct {
	ID       int    `json:"id"`
	PID      int    `json:"pid"`
	State    string `json:"state"`
	Slots    int    `json:"slots"`
	Restarts uint64 `json:"restarts"`
	LastExit string `json:"last_exit,omitempty"`
}

func (c *fakeCatalog) BackendStates() map[string]any {
	return map[string]any{"workers": []workerState{{ID: 0, PID: 4242, State: "ready", Slots: 4}, {ID: 1, State: "restarting", Restarts: 3, LastExit: "signal: killed"}}}
}

func tokens(texts ...string) []infer.Event {
	var evs []infer.Event
	for _, t := range texts {
		evs = append(evs, infer.Event{Token: infer.Token{Count: 1, Text: t}})
	}
	return evs
}

func done(reason string, prompt, completion uint32) infer.Event {
	return infer.Event{Done: &infer.Done{FinishReason: reason, PromptTokens: prompt, CompletionTokens: completion}}
}

// selfSigned makes a loopback certificate and a pool that trusts it.
func selfSigned(t testing.TB) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "h3infer test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

type harness struct {
	gw      *Gateway
	sched   *fakeScheduler
	catalog *fakeCatalog
	clients map[string]*http.Client // by protocol label
	// closeClients closes the clients' connections (idempotent).
	closeClients func()
	base         string           // https://host:port
	admin        string           // http://host:port
	ring         *tlsbind.KeyRing // signs the harness's tokens
	cred         string           // credential the clients present
	pool         *x509.CertPool
}

func newHarness(t testing.TB, mutate func(*Config)) *harness {
	t.Helper()
	before := runtime.NumGoroutine()
	cert, pool := selfSigned(t)
	ring, verifier := testKeys(t)
	cfg := Config{
		Listen:       "127.0.0.1:0",
		Admin:        "127.0.0.1:0",
		TLS:          &tls.Config{Certificates: []tls.Certificate{cert}},
		MaxBodyBytes: 4096,
		Registry:     prometheus.NewRegistry(),
		Auth:         AuthConfig{Tokens: verifier},
	}
	if mutate != nil {
		mutate(&cfg)
	}
	h := &harness{sched: &fakeScheduler{}, catalog: &fakeCatalog{}, ring: ring, pool: pool}
	h.cred = h.issue(t, tlsbind.Claims{Tenant: "tenant-a"})
	h.catalog.ready.Store(true)
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
		return append(tokens("Hel", "", "lo"), done(infer.FinishStop, 5, 3)), nil
	})
	gw, err := New(cfg, h.sched, h.catalog, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := gw.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	h.gw = gw
	h.base = "https://" + gw.Addr()
	h.admin = "http://" + gw.AdminAddr()

	h3tr := &http3.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	h2tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
	h1tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, NextProtos: []string{"http/1.1"}}}
	bearer := bearerOfCredential(t, h.cred)
	h.clients = map[string]*http.Client{
		"h3":       {Transport: withBearer(bearer, h3tr)},
		"h2":       {Transport: withBearer(bearer, h2tr)},
		"http/1.1": {Transport: withBearer(bearer, h1tr)},
	}
	h.closeClients = func() {
		h3tr.Close()
		h2tr.CloseIdleConnections()
		h1tr.CloseIdleConnections()
	}
	t.Cleanup(func() {
		h.closeClients()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := gw.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				t.Errorf("goroutines leaked: %d before, %d after\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
	return h
}

func (h *harness) post(t *testing.T, proto, path, body string, header ...string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, h.base+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	return h.do(t, proto, req)
}

func (h *harness) do(t *testing.T, proto string, req *http.Request) *http.Response {
	t.Helper()
	resp, err := h.clients[proto].Do(req)
	if err != nil {
		t.Fatalf("%s %s over %s: %v", req.Method, req.URL.Path, proto, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	wantProto := map[string]int{"h3": 3, "h2": 2, "http/1.1": 1}[proto]
	if resp.ProtoMajor != wantProto {
		t.Fatalf("response came over %s, want %s", resp.Proto, proto)
	}
	return resp
}

// sseEvents reads a whole event stream and returns each event's data.
func sseEvents(t *testing.T, r io.Reader) []string {
	t.Helper()
	var out []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			t.Fatalf("line %q is not an SSE data line", line)
		}
		out = append(out, data)
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("reading stream: %v", err)
	}
	return out
}

type streamChunk struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
	Choices []struct {
		Index int `json:"index"`
		Delta struct {
			Role    string  `json:"role"`
			Content *string `json:"content"`
		} `json:"delta"`
		Text         string  `json:"text"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *usage `json:"usage"`
}

var protocols = []string{"h3", "h2"}

func TestChatStreaming(t *testing.T) {
	h := newHarness(t, nil)
	for _, proto := range protocols {
		for _, includeUsage := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/usage=%v", proto, includeUsage), func(t *testing.T) {
				body := `{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true`
				if includeUsage {
					body += `,"stream_options":{"include_usage":true}`
				}
				resp := h.post(t, proto, "/v1/chat/completions", body+`}`)
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("status %d", resp.StatusCode)
				}
				if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
					t.Errorf("Content-Type %q, want text/event-stream", ct)
				}
				if cc := resp.Header.Get("Cache-Control"); cc != "no-cache" {
					t.Errorf("Cache-Control %q, want no-cache", cc)
				}
				events := sseEvents(t, resp.Body)
				if len(events) == 0 || events[len(events)-1] != "[DONE]" {
					t.Fatalf("stream does not end with [DONE]: %q", events)
				}
				var chunks []streamChunk
				for _, e := range events[:len(events)-1] {
					var c streamChunk
					if err := json.Unmarshal([]byte(e), &c); err != nil {
						t.Fatalf("chunk %q: %v", e, err)
					}
					chunks = append(chunks, c)
				}
				want := 4 // role, "Hel", "lo", finish; the held-back token makes none
				if includeUsage {
					want++
				}
				if len(chunks) != want {
					t.Fatalf("got %d chunks, want %d: %q", len(chunks), want, events)
				}
				for _, c := range chunks {
					if !strings.HasPrefix(c.ID, "chatcmpl-") || c.ID != chunks[0].ID || c.Object != "chat.completion.chunk" || c.Model != "demo" || c.Created == 0 {
						t.Errorf("chunk envelope %+v", c)
					}
				}
				if d := chunks[0].Choices[0].Delta; d.Role != "assistant" || d.Content == nil || *d.Content != "" {
					t.Errorf("first delta %+v, want role assistant and empty content", d)
				}
				var text string
				for _, c := range chunks[1:3] {
					if c.Choices[0].FinishReason != nil {
						t.Errorf("token chunk has finish_reason %q", *c.Choices[0].FinishReason)
					}
					text += *c.Choices[0].Delta.Content
				}
				if text != "Hello" {
					t.Errorf("streamed text %q, want Hello", text)
				}
				if fr := chunks[3].Choices[0].FinishReason; fr == nil || *fr != "stop" {
					t.Errorf("final chunk finish_reason %v, want stop", fr)
				}
				if includeUsage {
					u := chunks[4]
					if len(u.Choices) != 0 || u.Usage == nil || *u.Usage != (usage{5, 3, 8}) {
						t.Errorf("usage chunk %+v, want empty choices and usage 5+3=8", u)
					}
				}
			})
		}
	}
}

func TestTextStreaming(t *testing.T) {
	h := newHarness(t, nil)
	resp := h.post(t, "h3", "/v1/completions", `{"model":"demo","prompt":"once","stream":true}`)
	events := sseEvents(t, resp.Body)
	if len(events) != 4 || events[3] != "[DONE]" {
		t.Fatalf("events %q, want two tokens, finish, [DONE]", events)
	}
	var c streamChunk
	if err := json.Unmarshal([]byte(events[0]), &c); err != nil {
		t.Fatal(err)
	}
	if c.Object != "text_completion" || !strings.HasPrefix(c.ID, "cmpl-") || c.Choices[0].Text != "Hel" {
		t.Errorf("first chunk %+v", c)
	}
}

func TestNonStreaming(t *testing.T) {
	h := newHarness(t, nil)
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
		return append(tokens("Hel", "", "lo"), done(infer.FinishLength, 5, 4)), nil
	})
	tests := map[string]struct {
		path, body, object, idPrefix string
	}{
		"chat": {"/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}`, "chat.completion", "chatcmpl-"},
		"text": {"/v1/completions", `{"model":"demo","prompt":["once"]}`, "text_completion", "cmpl-"},
	}
	for name, tc := range tests {
		for _, proto := range protocols {
			t.Run(name+"/"+proto, func(t *testing.T) {
				resp := h.post(t, proto, tc.path, tc.body)
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("status %d", resp.StatusCode)
				}
				var got struct {
					ID      string `json:"id"`
					Object  string `json:"object"`
					Model   string `json:"model"`
					Choices []struct {
						Text    string `json:"text"`
						Message struct {
							Role    string `json:"role"`
							Content string `json:"content"`
						} `json:"message"`
						FinishReason string `json:"finish_reason"`
					} `json:"choices"`
					Usage usage `json:"usage"`
				}
				if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
					t.Fatal(err)
				}
				if got.Object != tc.object || !strings.HasPrefix(got.ID, tc.idPrefix) || got.Model != "demo" {
					t.Errorf("envelope %+v", got)
				}
				text := got.Choices[0].Text
				if name == "chat" {
					text = got.Choices[0].Message.Content
					if got.Choices[0].Message.Role != "assistant" {
						t.Errorf("role %q", got.Choices[0].Message.Role)
					}
				}
				if text != "Hello" || got.Choices[0].FinishReason != "length" {
					t.Errorf("choice %+v, want Hello / length", got.Choices[0])
				}
				if got.Usage != (usage{5, 4, 9}) {
					t.Errorf("usage %+v, want 5+4=9", got.Usage)
				}
			})
		}
	}
}

func TestSubmittedJob(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.DefaultMaxTokens = 77 })
	tests := map[string]struct {
		body     string
		priority string
		check    func(t *testing.T, r scheduler.Request)
	}{
		"chat defaults": {
			body: `{"model":"demo","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],"user":"ignored"}`,
			check: func(t *testing.T, r scheduler.Request) {
				j := r.Job
				if j.Model != "demo" || len(j.Messages) != 2 || j.Messages[0].Role != "system" || j.Messages[0].Content != "be brief" {
					t.Errorf("job %+v", j)
				}
				if j.MaxTokens != 77 || j.Temperature != 1 || j.TopP != 1 || j.HasSeed || j.Stop != nil {
					t.Errorf("defaults: %+v", j)
				}
				if r.Urgency != 3 || r.Deadline.IsZero() {
					t.Errorf("urgency %d deadline %v, want 3 and set", r.Urgency, r.Deadline)
				}
			},
		},
		"sampling params": {
			body:     `{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":9,"max_completion_tokens":12,"temperature":0,"top_p":0.5,"seed":42,"stop":"\n","n":1,"ignore_eos":true}`,
			priority: "u=1, i",
			check: func(t *testing.T, r scheduler.Request) {
				j := r.Job
				if j.MaxTokens != 12 || j.Temperature != 0 || j.TopP != 0.5 || !j.HasSeed || j.Seed != 42 || len(j.Stop) != 1 || j.Stop[0] != "\n" || !j.IgnoreEOS {
					t.Errorf("job %+v", j)
				}
				if r.Urgency != 1 {
					t.Errorf("urgency %d, want 1 from the Priority header", r.Urgency)
				}
			},
		},
		"text prompt": {
			body: `{"model":"org/other","prompt":"abc","max_tokens":3,"stop":["x","y"]}`,
			check: func(t *testing.T, r scheduler.Request) {
				j := r.Job
				if j.Prompt != "abc" || j.Messages != nil || j.MaxTokens != 3 || len(j.Stop) != 2 {
					t.Errorf("job %+v", j)
				}
			},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			path := "/v1/chat/completions"
			if strings.Contains(tc.body, `"prompt"`) {
				path = "/v1/completions"
			}
			var hdr []string
			if tc.priority != "" {
				hdr = []string{"Priority", tc.priority}
			}
			resp := h.post(t, "h3", path, tc.body, hdr...)
			if resp.StatusCode != http.StatusOK {
				b, _ := io.ReadAll(resp.Body)
				t.Fatalf("status %d: %s", resp.StatusCode, b)
			}
			r, _ := h.sched.last()
			tc.check(t, r)
		})
	}
}

func TestErrorResponses(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxBodyBytes = 1024 })
	chat := func(extra string) string {
		return `{"model":"demo","messages":[{"role":"user","content":"hi"}]` + extra + `}`
	}
	failWith := func(err error, evs ...infer.Event) func(*scheduler.Request) ([]infer.Event, error) {
		return func(*scheduler.Request) ([]infer.Event, error) { return evs, err }
	}
	workerErr := func(code, msg string) infer.Event {
		return infer.Event{Err: &infer.Error{Code: code, Message: msg}}
	}
	tests := map[string]struct {
		method, path, body string
		script             func(*scheduler.Request) ([]infer.Event, error)
		status             int
		code, param        string
		header             map[string]string
		reqHeader          map[string]string
	}{
		"malformed json":       {body: `{"model":"demo",`, status: 400, code: "invalid_json"},
		"empty body":           {body: ``, status: 400, code: "invalid_json"},
		"wrong type":           {body: chat(`,"temperature":"hot"`), status: 400, code: "invalid_type", param: "temperature"},
		"temperature too high": {body: chat(`,"temperature":2.5`), status: 400, param: "temperature"},
		"negative temperature": {body: chat(`,"temperature":-1`), status: 400, param: "temperature"},
		"top_p zero":           {body: chat(`,"top_p":0`), status: 400, param: "top_p"},
		"n zero":               {body: chat(`,"n":0`), status: 400, param: "n"},
		"n seventeen":          {body: chat(`,"n":17`), status: 400, param: "n"},
		"max_tokens zero":      {body: chat(`,"max_tokens":0`), status: 400, param: "max_tokens"},
		"five stops":           {body: chat(`,"stop":["a","b","c","d","e"]`), status: 400, param: "stop"},
		"stream_options alone": {body: chat(`,"stream_options":{"include_usage":true}`), status: 400, param: "stream_options"},
		"no model":             {body: `{"messages":[{"role":"user","content":"hi"}]}`, status: 400, param: "model"},
		"no messages":          {body: `{"model":"demo","messages":[]}`, status: 400, param: "messages"},
		"bad role":             {body: `{"model":"demo","messages":[{"role":"robot","content":"hi"}]}`, status: 400, param: "messages[0].role"},
		"image part":           {body: `{"model":"demo","messages":[{"role":"user","content":[{"type":"image_url"}]}]}`, status: 400, param: "messages[0].content"},
		"two prompts":          {path: "/v1/completions", body: `{"model":"demo","prompt":["a","b"]}`, status: 400, param: "prompt"},
		"token prompt":         {path: "/v1/completions", body: `{"model":"demo","prompt":[1,2]}`, status: 400, param: "prompt"},
		"unknown model":        {body: `{"model":"nope","messages":[{"role":"user","content":"hi"}]}`, status: 404, code: "model_not_found", param: "model"},
		"body too large":       {body: chat(`,"user":"` + strings.Repeat("x", 1100) + `"`), status: 413, code: "request_too_large"},
		"wrong method":         {method: http.MethodGet, status: 405, code: "method_not_allowed", header: map[string]string{"Allow": "POST"}},
		"unknown route":        {path: "/v1/rerank", status: 404, code: "not_found"},
		"context length": {
			body: chat(""), script: failWith(nil, workerErr(infer.CodeContextLength, "prompt is 900 tokens; the context holds 512")),
			status: 400, code: "context_length_exceeded", param: "messages",
		},
		"context length, text route": {
			path: "/v1/completions", body: `{"model":"demo","prompt":"x"}`,
			script: failWith(nil, workerErr(infer.CodeContextLength, "too long")),
			status: 400, code: "context_length_exceeded", param: "prompt",
		},
		"worker model not found": {body: chat(""), script: failWith(nil, workerErr(infer.CodeModelNotFound, "unloaded")), status: 404, code: "model_not_found"},
		"worker invalid request": {body: chat(""), script: failWith(nil, workerErr(infer.CodeInvalidRequest, "bad stop")), status: 400},
		"worker internal":        {body: chat(""), script: failWith(nil, workerErr(infer.CodeInternal, "onnx: boom")), status: 500, code: "internal_error"},
		"overloaded": {
			body: chat(""), script: failWith(fmt.Errorf("submit: %w", &scheduler.OverloadError{RetryAfter: 1500 * time.Millisecond})),
			status: 503, code: "overloaded", header: map[string]string{"Retry-After": "2"},
		},
		"deadline": {body: chat(""), script: failWith(fmt.Errorf("queued: %w", scheduler.ErrDeadline)), status: 504, code: "timeout"},
		"tenant over its bound": {
			body: chat(""), script: failWith(fmt.Errorf("submit: %w", &scheduler.TenantLimitError{Tenant: "a", RetryAfter: 3 * time.Second})),
			status: 429, code: "tenant_queue_full", header: map[string]string{"Retry-After": "3"},
		},
		"deadline header not a duration": {body: chat(""), reqHeader: map[string]string{"X-Request-Timeout": "soon"}, status: 400},
		"deadline header beyond max":     {body: chat(""), reqHeader: map[string]string{"X-Request-Timeout": "1h"}, status: 400},
		"deadline header negative":       {body: chat(""), reqHeader: map[string]string{"X-Request-Timeout": "-1s"}, status: 400},
		"closed":                         {body: chat(""), script: failWith(scheduler.ErrClosed), status: 503, code: "shutting_down"},
		"unexpected scheduler error": {
			body: chat(""), script: failWith(errors.New("disk on fire")), status: 500, code: "internal_error",
		},
	}
	for name, tc := range tests {
		for _, proto := range protocols {
			t.Run(name+"/"+proto, func(t *testing.T) {
				script := tc.script
				if script == nil {
					script = func(*scheduler.Request) ([]infer.Event, error) {
						return nil, errors.New("the scheduler must not be reached")
					}
				}
				h.sched.setScript(script)
				method, path := tc.method, tc.path
				if method == "" {
					method = http.MethodPost
				}
				if path == "" {
					path = "/v1/chat/completions"
				}
				req, err := http.NewRequest(method, h.base+path, strings.NewReader(tc.body))
				if err != nil {
					t.Fatal(err)
				}
				for k, v := range tc.reqHeader {
					req.Header.Set(k, v)
				}
				resp := h.do(t, proto, req)
				if resp.StatusCode != tc.status {
					b, _ := io.ReadAll(resp.Body)
					t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, b)
				}
				if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
					t.Errorf("Content-Type %q", ct)
				}
				for k, v := range tc.header {
					if got := resp.Header.Get(k); got != v {
						t.Errorf("%s: %q, want %q", k, got, v)
					}
				}
				var body struct {
					Error struct {
						Message string  `json:"message"`
						Type    string  `json:"type"`
						Param   *string `json:"param"`
						Code    *string `json:"code"`
					} `json:"error"`
				}
				if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
					t.Fatalf("error body: %v", err)
				}
				e := body.Error
				if e.Message == "" || e.Type == "" {
					t.Errorf("error object %+v lacks message or type", e)
				}
				if tc.code != "" && (e.Code == nil || *e.Code != tc.code) {
					t.Errorf("code %v, want %q", deref(e.Code), tc.code)
				}
				if tc.param != "" && (e.Param == nil || *e.Param != tc.param) {
					t.Errorf("param %v, want %q", deref(e.Param), tc.param)
				}
				if tc.status == 500 && strings.Contains(e.Message, "boom") {
					t.Errorf("internal error leaks worker detail: %q", e.Message)
				}
			})
		}
	}
}

func deref(p *string) string {
	if p == nil {
		return "<null>"
	}
	return *p
}

func TestStreamWithoutResult(t *testing.T) {
	h := newHarness(t, nil)
	h.sched.hangUp.Store(true)
	for name, evs := range map[string][]infer.Event{
		"before any token": nil,
		"after a token":    tokens("a"),
	} {
		t.Run(name, func(t *testing.T) {
			h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return evs, nil })
			resp := h.post(t, "h3", "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true}`)
			if len(evs) == 0 {
				if resp.StatusCode != http.StatusInternalServerError {
					t.Errorf("status %d, want 500", resp.StatusCode)
				}
				return
			}
			events := sseEvents(t, resp.Body)
			if n := len(events); n == 0 || !strings.Contains(events[n-1], `"error"`) {
				t.Errorf("stream %q does not end with an error event", events)
			}
		})
	}
}

func TestErrorAfterStreamStarted(t *testing.T) {
	h := newHarness(t, nil)
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
		return append(tokens("par", "tial"), infer.Event{Err: &infer.Error{Code: infer.CodeInternal, Message: "worker died"}}), nil
	})
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			resp := h.post(t, proto, "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true}`)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d", resp.StatusCode)
			}
			events := sseEvents(t, resp.Body)
			if len(events) != 4 {
				t.Fatalf("events %q, want role, two tokens, error", events)
			}
			var last struct {
				Error *errorObject `json:"error"`
			}
			if err := json.Unmarshal([]byte(events[3]), &last); err != nil || last.Error == nil {
				t.Fatalf("last event %q is not an error object (%v)", events[3], err)
			}
			if last.Error.Code == nil || *last.Error.Code != infer.CodeInternal {
				t.Errorf("error code %v", deref(last.Error.Code))
			}
		})
	}
}

func TestClientDisconnectClosesStream(t *testing.T) {
	h := newHarness(t, nil)
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
		return tokens("first"), nil // and then nothing: the worker is still busy
	})
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.base+"/v1/chat/completions",
				strings.NewReader(`{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true}`))
			if err != nil {
				t.Fatal(err)
			}
			resp := h.do(t, proto, req)
			br := bufio.NewReader(resp.Body)
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					t.Fatalf("reading stream: %v", err)
				}
				if strings.Contains(line, `"first"`) {
					break
				}
			}
			_, st := h.sched.last()
			select {
			case <-st.closed:
				t.Fatal("stream closed while the client was still reading")
			default:
			}
			cancel()
			select {
			case <-st.closed:
			case <-time.After(5 * time.Second):
				t.Fatal("Stream.Close was not called after the client went away")
			}
		})
	}
}

func TestAltSvcOnTCP(t *testing.T) {
	h := newHarness(t, nil)
	_, port, _ := net.SplitHostPort(h.gw.Addr())
	want := fmt.Sprintf(`h3=":%s"; ma=86400`, port)
	for _, proto := range []string{"h2", "http/1.1"} {
		t.Run(proto, func(t *testing.T) {
			for _, path := range []string{"/", "/v1/models", "/nowhere"} {
				req, _ := http.NewRequest(http.MethodGet, h.base+path, nil)
				resp := h.do(t, proto, req)
				if got := resp.Header.Get("Alt-Svc"); got != want {
					t.Errorf("%s: Alt-Svc %q, want %q", path, got, want)
				}
			}
		})
	}
	req, _ := http.NewRequest(http.MethodGet, h.base+"/v1/models", nil)
	if got := h.do(t, "h3", req).Header.Get("Alt-Svc"); got != "" {
		t.Errorf("h3 response advertises Alt-Svc %q", got)
	}
}

func TestModels(t *testing.T) {
	h := newHarness(t, nil)
	req, _ := http.NewRequest(http.MethodGet, h.base+"/v1/models", nil)
	resp := h.do(t, "h3", req)
	var list struct {
		Object string        `json:"object"`
		Data   []modelObject `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatal(err)
	}
	if list.Object != "list" || len(list.Data) != 2 {
		t.Fatalf("list %+v", list)
	}
	if m := list.Data[0]; m.ID != "demo" || m.Object != "model" || m.OwnedBy != "h3infer" || m.Created == 0 {
		t.Errorf("model %+v", m)
	}
	req, _ = http.NewRequest(http.MethodGet, h.base+"/v1/models/org/other", nil)
	if resp := h.do(t, "h2", req); resp.StatusCode != http.StatusOK {
		t.Errorf("GET /v1/models/org/other: %d", resp.StatusCode)
	}
	req, _ = http.NewRequest(http.MethodGet, h.base+"/v1/models/missing", nil)
	if resp := h.do(t, "h2", req); resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /v1/models/missing: %d, want 404", resp.StatusCode)
	}
	req, _ = http.NewRequest(http.MethodDelete, h.base+"/v1/models", nil)
	if resp := h.do(t, "h2", req); resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") == "" {
		t.Errorf("DELETE /v1/models: %d Allow %q", resp.StatusCode, resp.Header.Get("Allow"))
	}
}

func TestNotReady(t *testing.T) {
	h := newHarness(t, nil)
	h.catalog.ready.Store(false)
	resp, err := http.Get(h.admin + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("/readyz while no worker is ready: %d, want 503", resp.StatusCode)
	}
	// Before any worker is up, a request is not "model not found".
	r := h.post(t, "h3", "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"hi"}]}`)
	if r.StatusCode != http.StatusServiceUnavailable || r.Header.Get("Retry-After") == "" {
		t.Errorf("completion while not ready: %d Retry-After %q, want 503 with Retry-After", r.StatusCode, r.Header.Get("Retry-After"))
	}
	h.catalog.ready.Store(true)
	for path, want := range map[string]string{"/readyz": "ok\n", "/healthz": "ok\n"} {
		resp, err := http.Get(h.admin + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(b) != want {
			t.Errorf("%s: %d %q", path, resp.StatusCode, b)
		}
	}
}

func TestMetrics(t *testing.T) {
	h := newHarness(t, nil)
	for _, proto := range []string{"h3", "h2", "h2", "http/1.1"} {
		req, _ := http.NewRequest(http.MethodGet, h.base+"/v1/models", nil)
		h.do(t, proto, req)
	}
	resp := h.post(t, "h3", "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true}`)
	io.Copy(io.Discard, resp.Body)
	resp = h.post(t, "h3", "/v1/chat/completions", `{"model":"nope","messages":[{"role":"user","content":"hi"}]}`)
	io.Copy(io.Discard, resp.Body)

	// The handler counts a request after it returns, which can be just
	// after the client has read the body.
	var text string
	want := []string{
		`h3infer_http_requests_total{protocol="h3",route="/v1/models",status="200"} 1`,
		`h3infer_http_requests_total{protocol="h2",route="/v1/models",status="200"} 2`,
		`h3infer_http_requests_total{protocol="http/1.1",route="/v1/models",status="200"} 1`,
		`h3infer_http_requests_total{protocol="h3",route="/v1/chat/completions",status="200"} 1`,
		`h3infer_http_requests_total{protocol="h3",route="/v1/chat/completions",status="404"} 1`,
		`h3infer_time_to_first_token_seconds_count{model="demo",urgency="3"} 1`,
		// Three token events: the first gives TTFT, the two after it an
		// inter-token gap each.
		`h3infer_inter_token_latency_seconds_count{model="demo",urgency="3"} 2`,
		`h3infer_queue_wait_seconds_count{model="demo",urgency="3"} 1`,
		`h3infer_request_duration_seconds_count{model="demo",urgency="3"} 1`,
		`h3infer_stream_tokens_total 3`,
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		r, err := http.Get(h.admin + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(r.Body)
		r.Body.Close()
		text = string(b)
		missing := 0
		for _, w := range want {
			if !strings.Contains(text, w) {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) {
			for _, w := range want {
				if !strings.Contains(text, w) {
					t.Errorf("metrics lack %s", w)
				}
			}
			t.Logf("metrics:\n%s", text)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(text, "h3infer_http_in_flight_requests 0") {
		t.Errorf("in-flight gauge is not back to 0")
	}
	// Two HTTP/3 requests went over the harness's QUIC connection.
	if v := sampleValue(t, text, "h3infer_quic_connections_total"); v < 1 {
		t.Errorf("h3infer_quic_connections_total = %v, want >= 1", v)
	}
	if v := sampleValue(t, text, "h3infer_quic_packets_sent_total"); v < 4 {
		t.Errorf("h3infer_quic_packets_sent_total = %v, want >= 4", v)
	}
	if v := sampleValue(t, text, "h3infer_quic_packets_received_total"); v < 4 {
		t.Errorf("h3infer_quic_packets_received_total = %v, want >= 4", v)
	}
	promtoolCheck(t, text)
}

func TestSamePortOnUDPAndTCP(t *testing.T) {
	h := newHarness(t, nil)
	_, port, err := net.SplitHostPort(h.gw.Addr())
	if err != nil || port == "0" {
		t.Fatalf("Addr %q", h.gw.Addr())
	}
	for _, proto := range []string{"h3", "h2"} {
		req, _ := http.NewRequest(http.MethodGet, h.base+"/v1/models", nil)
		if resp := h.do(t, proto, req); resp.StatusCode != http.StatusOK {
			t.Errorf("%s: status %d", proto, resp.StatusCode)
		}
	}
}

func TestShutdownEndsStreamsWithAnErrorEvent(t *testing.T) {
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			h := newHarness(t, nil)
			h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
				return tokens("busy"), nil // never done
			})
			resp := h.post(t, proto, "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true}`)
			br := bufio.NewReader(resp.Body)
			if _, err := br.ReadString('\n'); err != nil {
				t.Fatal(err)
			}
			_, st := h.sched.last()
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			shut := make(chan error, 1)
			go func() { shut <- h.gw.Shutdown(ctx) }()
			events := sseEvents(t, br)
			if len(events) == 0 || !strings.Contains(events[len(events)-1], `"shutting_down"`) {
				t.Errorf("stream ended with %q, want an error event with code shutting_down", events)
			}
			for _, e := range events {
				if e == "[DONE]" {
					t.Error("a stream cut short by shutdown claims [DONE]")
				}
			}
			select {
			case err := <-shut:
				if err != nil {
					t.Errorf("Shutdown after every stream ended: %v", err)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("Shutdown did not return")
			}
			select {
			case <-st.closed:
			case <-time.After(5 * time.Second):
				t.Fatal("the ended stream was not closed")
			}
			if err := h.gw.Shutdown(context.Background()); err != nil {
				t.Errorf("second Shutdown: %v", err)
			}
		})
	}
}

func TestShutdownLetsStreamsFinishWithinGrace(t *testing.T) {
	h := newHarness(t, nil)
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
		return tokens("busy"), nil
	})
	resp := h.post(t, "h3", "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true}`)
	br := bufio.NewReader(resp.Body)
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	_, st := h.sched.last()
	shut := make(chan error, 1)
	go func() { shut <- h.gw.Shutdown(context.Background()) }()
	// Shutdown has begun (GOAWAY) while the stream still runs.
	time.Sleep(100 * time.Millisecond)
	st.events <- done(infer.FinishStop, 2, 1)
	events := sseEvents(t, br)
	if len(events) == 0 || events[len(events)-1] != "[DONE]" {
		t.Errorf("stream ended with %q, want it to complete with [DONE]", events)
	}
	select {
	case err := <-shut:
		if err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Shutdown did not return once the stream completed")
	}
}

func TestNewValidates(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	_, err := New(Config{MaxBodyBytes: -1, Listen: "nonsense", Auth: AuthConfig{
		EarlyData:      map[string]tlsbind.EarlyPolicy{"/v1/chat/completion": tlsbind.EarlyServe, "/v1/models": "sometimes"},
		TrustedProxies: []netip.Prefix{{}, netip.MustParsePrefix("10.0.0.1/8")},
	}}, nil, nil, log)
	if err == nil {
		t.Fatal("New accepted a config without TLS")
	}
	for _, want := range []string{"gateway.tls", "gateway.max_body_bytes", "gateway.listen", "scheduler", "catalog",
		`gateway.early_data["/v1/chat/completion"]: not a route; routes are /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /v1/models/, /tokenize, /detokenize`,
		`gateway.early_data["/v1/models"]: want serve`, "gateway.auth.trusted_proxies[0]", "gateway.auth.trusted_proxies[1]"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
}

// resumes opens a QUIC connection with cache and reports whether the TLS
// session was resumed. Before closing it waits for the server's ticket,
// sent after the handshake, to land in cache.
func resumes(t *testing.T, h *harness, addr string, cache tls.ClientSessionCache) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tickets := &ticketSignal{ClientSessionCache: cache, got: make(chan struct{}, 1)}
	conf := &tls.Config{RootCAs: h.pool, ServerName: "127.0.0.1", ClientSessionCache: tickets, NextProtos: []string{http3.NextProtoH3}}
	conn, err := quic.DialAddr(ctx, addr, conf, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer conn.CloseWithError(0, "")
	select {
	case <-tickets.got:
	case <-ctx.Done():
		t.Fatalf("no session ticket from %s", addr)
	}
	return conn.ConnectionState().TLS.DidResume
}

func key(b byte) [32]byte {
	var k [32]byte
	k[0] = b
	return k
}

func TestTicketsSurviveOneRotation(t *testing.T) {
	h := newHarness(t, nil)
	h.gw.SetSessionTicketKeys([][32]byte{key(1)})
	cache := tls.NewLRUClientSessionCache(8)
	if resumes(t, h, h.gw.Addr(), cache) {
		t.Fatal("first connection resumed")
	}
	// Rotation: a new key first, the old one kept for decryption.
	h.gw.SetSessionTicketKeys([][32]byte{key(2), key(1)})
	old := tls.NewLRUClientSessionCache(8)
	if !resumes(t, h, h.gw.Addr(), cache) {
		t.Error("a ticket issued before the rotation did not resume")
	}
	// That connection got a ticket under key 2; one under key 1 only is
	// gone once key 1 is dropped.
	if resumes(t, h, h.gw.Addr(), old) {
		t.Fatal("an empty cache resumed")
	}
	h.gw.SetSessionTicketKeys([][32]byte{key(3), key(2)})
	if !resumes(t, h, h.gw.Addr(), cache) {
		t.Error("a ticket under the previous key did not resume")
	}
	h.gw.SetSessionTicketKeys([][32]byte{key(4)})
	if resumes(t, h, h.gw.Addr(), old) {
		t.Error("a ticket whose key was dropped still resumed")
	}
}

func TestInstancesSharingKeysResumeEachOthersTickets(t *testing.T) {
	a := newHarness(t, nil)
	// Instances behind one name serve the same certificate and accept the
	// same tokens.
	b := newHarness(t, func(c *Config) { c.TLS = a.gw.cfg.TLS.Clone(); c.Auth = a.gw.cfg.Auth })
	shared := [][32]byte{key(7)}
	a.gw.SetSessionTicketKeys(shared)
	b.gw.SetSessionTicketKeys(shared)
	cache := tls.NewLRUClientSessionCache(8)
	if resumes(t, a, a.gw.Addr(), cache) {
		t.Fatal("first connection resumed")
	}
	if !resumes(t, a, b.gw.Addr(), cache) {
		t.Error("a ticket from instance a did not resume on instance b sharing its keys")
	}
	lone := newHarness(t, func(c *Config) { c.TLS = a.gw.cfg.TLS.Clone(); c.Auth = a.gw.cfg.Auth })
	lone.gw.SetSessionTicketKeys([][32]byte{key(8)})
	if resumes(t, a, lone.gw.Addr(), cache) {
		t.Error("an instance with other keys resumed the ticket")
	}
}

// TestStateShowsWorkers: /debug/state carries each worker process's
// supervision state from the catalog, beside readiness and models.
func TestStateShowsWorkers(t *testing.T) {
	h := newHarness(t, nil)
	resp, err := http.Get(h.admin + "/debug/state")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got struct {
		Workers []workerState `json:"workers"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || len(got.Workers) != 2 || got.Workers[0].PID != 4242 || got.Workers[1].State != "restarting" || got.Workers[1].Restarts != 3 {
		t.Errorf("got %d %+v, want the catalog's two workers", resp.StatusCode, got)
	}
}

// TestMaxStreams checks the stream limit a client connection is granted:
// the configured one, and by default far more than quic-go's 100, so that a
// client multiplexing many completions over one connection does not queue
// them on its side.
func TestMaxStreams(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  int
		want int
	}{{"default", 0, DefaultMaxStreams}, {"configured", 150, 150}} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config) { c.MaxStreams = tc.set })
			qc, _ := h.rawH3(t)
			opened := 0
			for ; opened <= tc.want; opened++ {
				if _, err := qc.OpenStream(); err != nil {
					if !errors.Is(err, &quic.StreamLimitReachedError{}) {
						t.Fatalf("stream %d: %v", opened+1, err)
					}
					break
				}
			}
			if opened != tc.want {
				t.Errorf("opened %d streams at once, want %d", opened, tc.want)
			}
		})
	}
}
