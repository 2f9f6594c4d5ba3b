package upstream

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go/http3"

	"h3infer/certs"
	"h3infer/config"
	"h3infer/infer"
)

// fake is an OpenAI-compatible server for the faults a real one cannot be
// made to produce: each test sets how it answers completions (and
// embeddings).
type fake struct {
	completions atomic.Pointer[http.HandlerFunc]
	// models is the body of GET /v1/models; modelsDown makes it 500.
	models     atomic.Pointer[string]
	modelsDown atomic.Bool
	// modelsGate, when set, holds GET /v1/models until it is closed.
	modelsGate atomic.Pointer[chan struct{}]
	probes     atomic.Int64
}

func (f *fake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/v1/models":
		f.probes.Add(1)
		if g := f.modelsGate.Load(); g != nil {
			select {
			case <-*g:
			case <-r.Context().Done():
				return
			}
		}
		if f.modelsDown.Load() {
			http.Error(w, `{"error":{"message":"down"}}`, http.StatusInternalServerError)
			return
		}
		body := `{"object":"list","data":[{"id":"m","object":"model"}]}`
		if m := f.models.Load(); m != nil {
			body = *m
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, body)
	case "/v1/chat/completions", "/v1/completions", "/v1/embeddings":
		// Read the body first, as real servers do: only then does
		// net/http notice that the client went away and end r's context.
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
		if h := f.completions.Load(); h != nil {
			(*h)(w, r)
			return
		}
		http.NotFound(w, r)
	default:
		http.NotFound(w, r)
	}
}

func (f *fake) answer(h http.HandlerFunc) { f.completions.Store(&h) }

// newFake serves f over plain HTTP on 127.0.0.1 and returns its base URL.
func newFake(t *testing.T) (*fake, string) {
	t.Helper()
	f := &fake{}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv.URL
}

// sseStart writes the headers of an event stream.
func sseStart(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	w.(http.Flusher).Flush()
}

func sseData(w http.ResponseWriter, data string) {
	fmt.Fprintf(w, "data: %s\n\n", data)
	w.(http.Flusher).Flush()
}

// chatChunk is a chat stream's chunk carrying text.
func chatChunk(text string) string {
	b, _ := json.Marshal(map[string]any{
		"object":  "chat.completion.chunk",
		"choices": []any{map[string]any{"index": 0, "delta": map[string]any{"content": text}, "finish_reason": nil}},
	})
	return string(b)
}

// streamTokens answers with a role chunk, the tokens, a finish, usage and
// [DONE].
func streamTokens(tokens ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		sseStart(w)
		sseData(w, `{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}`)
		for _, tok := range tokens {
			sseData(w, chatChunk(tok))
		}
		sseData(w, `{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}`)
		sseData(w, fmt.Sprintf(`{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":%d}}`, len(tokens)))
		sseData(w, "[DONE]")
	}
}

// streamTokensApart is streamTokens with each token in a write of its
// own, gap after the one before, as an upstream that does not coalesce
// writes sends them: none arrives with the next.
func streamTokensApart(gap time.Duration, tokens ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		sseStart(w)
		for _, tok := range tokens {
			sseData(w, chatChunk(tok))
			time.Sleep(gap)
		}
		sseData(w, `{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}`)
		sseData(w, "[DONE]")
	}
}

// streamTokensTogether sends the tokens in one write, as an upstream that
// coalesces its writes does.
func streamTokensTogether(tokens ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		sseStart(w)
		var b strings.Builder
		for _, tok := range tokens {
			fmt.Fprintf(&b, "data: %s\n\n", chatChunk(tok))
		}
		io.WriteString(w, b.String())
		w.(http.Flusher).Flush()
		sseData(w, `{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}`)
		sseData(w, "[DONE]")
	}
}

// testConfig is an upstream with short timeouts, serving model "m".
func testConfig(name, url string) Config {
	return Config{
		Name:             name,
		URL:              url,
		Models:           []string{"m"},
		DiscoverInterval: config.Duration(time.Hour),
		StallTimeout:     config.Duration(300 * time.Millisecond),
		Timeout:          config.Duration(5 * time.Second),
	}
}

// newTestSet builds a Set on a fresh registry, closed when the test ends
// and checked for goroutines it left behind.
func newTestSet(t *testing.T, opt Options, list ...Config) (*Set, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	opt.Registerer = reg
	if opt.Log == nil {
		opt.Log = slog.New(slog.NewTextHandler(t.Output(), nil))
	}
	s, err := NewSet(list, opt)
	if err != nil {
		t.Fatalf("NewSet: %v", err)
	}
	t.Cleanup(func() {
		s.Close()
		checkNoGoroutines(t)
	})
	return s, reg
}

// checkNoGoroutines fails when a probe or call goroutine outlives Close.
// Close waits for them to be done, which a goroutine says in its last
// deferred call, a moment before it is gone: so look for a while.
func checkNoGoroutines(t *testing.T) {
	t.Helper()
	var left string
	for range 100 {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		left = ""
		for _, fn := range []string{"upstream.(*call).run", "upstream.(*Handle).probeLoop"} {
			if strings.Contains(string(buf), fn) {
				left = fn
			}
		}
		if left == "" {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("a goroutine in %s outlived Set.Close", left)
}

// only returns the one backend serving model m.
func only(t *testing.T, s *Set, model string) *Handle {
	t.Helper()
	bs := s.Backends(model)
	if len(bs) != 1 {
		t.Fatalf("Backends(%q): got %d, want 1", model, len(bs))
	}
	return bs[0].(*Handle)
}

func chatRequest(model string) *infer.Request {
	return &infer.Request{Model: model, Messages: []infer.ChatMessage{{Role: "user", Content: "hi"}}, MaxTokens: 16, Urgency: 3}
}

// collect reads c's events until the channel closes.
func collect(t *testing.T, c infer.Call) []infer.Event {
	t.Helper()
	var out []infer.Event
	deadline := time.After(5 * time.Second)
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				return out
			}
			out = append(out, ev)
		case <-deadline:
			c.Cancel()
			t.Fatalf("call did not end; events so far: %+v", out)
		}
	}
}

// run opens a chat request for model on the set's one upstream and
// collects its events.
func run(t *testing.T, s *Set, r *infer.Request) []infer.Event {
	t.Helper()
	c, err := only(t, s, r.Model).Open(1, r)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return collect(t, c)
}

// text joins the token events' text.
func text(evs []infer.Event) string {
	var b strings.Builder
	for _, ev := range evs {
		if ev.Done == nil && ev.Err == nil {
			b.WriteString(ev.Token.Text)
		}
	}
	return b.String()
}

func last(t *testing.T, evs []infer.Event) infer.Event {
	t.Helper()
	if len(evs) == 0 {
		t.Fatal("no events; want a terminal one")
	}
	return evs[len(evs)-1]
}

func counter(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metric:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
						found = true
					}
				}
				if !found {
					continue metric
				}
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			}
		}
	}
	return 0
}

// eventually polls cond for up to 3s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// testCA makes a development CA and a leaf for loopback, as serve's
// state dir holds them; it returns the leaf's key pair and the CA file.
func testCA(t *testing.T) (tls.Certificate, string) {
	t.Helper()
	dev, err := certs.EnsureDev(t.TempDir(), certs.DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(dev.CertFile, dev.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	return cert, dev.CAFile
}

// newTLSFake serves f over HTTP/2 with TLS.
func newTLSFake(t *testing.T, cert tls.Certificate) (*fake, string) {
	t.Helper()
	f := &fake{}
	srv := httptest.NewUnstartedServer(f)
	srv.EnableHTTP2 = true
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshake of TestHTTP2AndHTTP3
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return f, srv.URL
}

// newH3Fake serves f over HTTP/3 on 127.0.0.1.
func newH3Fake(t *testing.T, cert tls.Certificate) (*fake, string) {
	t.Helper()
	f := &fake{}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http3.Server{Handler: f, TLSConfig: http3.ConfigureTLSConfig(&tls.Config{Certificates: []tls.Certificate{cert}})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(pc)
	}()
	t.Cleanup(func() {
		srv.Close()
		pc.Close()
		<-done
	})
	return f, "https://" + pc.LocalAddr().String()
}
