package loadgen

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go/http3"

	"h3infer/certs"
	"h3infer/internal/loadgen/bareserver"
)

func TestPercentile(t *testing.T) {
	var d []time.Duration
	for i := 100; i >= 1; i-- { // unsorted on purpose
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	p := summarize(d)
	for name, c := range map[string]struct{ got, want time.Duration }{
		"p50":  {p.P50, 50 * time.Millisecond},
		"p90":  {p.P90, 90 * time.Millisecond},
		"p99":  {p.P99, 99 * time.Millisecond},
		"max":  {p.Max, 100 * time.Millisecond},
		"mean": {p.Mean, 50500 * time.Microsecond},
	} {
		if c.got != c.want {
			t.Errorf("%s: got %v, want %v", name, c.got, c.want)
		}
	}
	if p.Count != 100 {
		t.Errorf("count: got %d, want 100", p.Count)
	}
	if one := summarize([]time.Duration{7}); one.P50 != 7 || one.P99 != 7 || one.Max != 7 {
		t.Errorf("one sample: got %+v, want every percentile 7", one)
	}
	if none := summarize(nil); none != (Percentiles{}) {
		t.Errorf("no samples: got %+v, want zero", none)
	}
}

func TestNewResult(t *testing.T) {
	samples := []Sample{
		{TTFT: 2 * time.Millisecond, E2E: 10 * time.Millisecond, ITL: []time.Duration{1, 2, 3}, Tokens: 4},
		{TTFT: 4 * time.Millisecond, E2E: 20 * time.Millisecond, ITL: []time.Duration{4}, Tokens: 2},
		{Err: "status_503", Detail: "503 Service Unavailable"},
		{Err: ErrTimeout},
		{Err: "status_503"},
		{E2E: 5 * time.Millisecond}, // ended at once: no first token
	}
	r := newResult(Config{Proto: ProtoH3, Concurrency: 3}, samples, 2*time.Second)
	if r.Requests != 6 || r.OK != 3 || r.ErrorCount() != 3 {
		t.Errorf("got %d requests, %d ok, %d errors; want 6, 3, 3", r.Requests, r.OK, r.ErrorCount())
	}
	if r.Errors["status_503"] != 2 || r.Errors[ErrTimeout] != 1 {
		t.Errorf("errors by kind: got %v", r.Errors)
	}
	if r.Tokens != 6 || r.TokensPerS != 3 || r.RequestsPS != 1.5 {
		t.Errorf("got %d tokens, %v tokens/s, %v requests/s; want 6, 3, 1.5", r.Tokens, r.TokensPerS, r.RequestsPS)
	}
	if r.ITL.Count != 4 || r.TTFT.Count != 2 || r.TTFT.Max != 4*time.Millisecond || r.E2E.Count != 3 {
		t.Errorf("got ITL %+v TTFT %+v", r.ITL, r.TTFT)
	}
	var b strings.Builder
	if err := r.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"6 requests, 3 ok, 3 errors", "errors: status_503 2, timeout 1", "3.0 tokens/s", "503 Service Unavailable"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
}

func TestParseDist(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for in, want := range map[string]Dist{
		"64":     {DistFixed, 64, 0},
		"16-256": {DistUniform, 16, 256},
		"exp:32": {DistExp, 32, 0},
	} {
		got, err := ParseDist(in)
		if err != nil || got != want {
			t.Errorf("ParseDist(%q): got %+v, %v; want %+v", in, got, err, want)
			continue
		}
		if got.String() != in {
			t.Errorf("String: got %q, want %q", got.String(), in)
		}
		var sum int
		for range 10000 {
			v := got.draw(rng)
			if v < 1 || (got.Kind == DistUniform && (v < 16 || v > 256)) || (got.Kind == DistFixed && v != 64) {
				t.Fatalf("%s drew %d", in, v)
			}
			sum += v
		}
		if mean := float64(sum) / 10000; got.Kind == DistExp && (mean < 28 || mean > 36) {
			t.Errorf("exp:32 mean: got %.1f", mean)
		}
	}
	for _, bad := range []string{"", "0", "-3", "9-2", "exp:0", "x"} {
		if _, err := ParseDist(bad); err == nil {
			t.Errorf("ParseDist(%q): want an error", bad)
		}
	}
}

func TestUrgencyMix(t *testing.T) {
	m, err := ParseUrgencyMix("0:1, 3:3")
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	var counts [8]int
	for range 8000 {
		counts[m.draw(rng)]++
	}
	if counts[0]+counts[3] != 8000 || counts[0] < 1700 || counts[0] > 2300 {
		t.Errorf("draws: got %v, want about 2000 of u=0 and 6000 of u=3", counts)
	}
	for _, bad := range []string{"8:1", "0:0", "a:1", "3"} {
		if _, err := ParseUrgencyMix(bad); err == nil {
			t.Errorf("ParseUrgencyMix(%q): want an error", bad)
		}
	}
}

func TestReadStream(t *testing.T) {
	for name, c := range map[string]struct {
		body       string
		err        string
		tokens, it int
		noContent  bool
	}{
		"usage": {body: "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n" +
			"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n" +
			"data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n" +
			"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n" +
			"data: {\"choices\":[],\"usage\":{\"completion_tokens\":3}}\n\n" +
			"data: [DONE]\n\n", tokens: 3, it: 1},
		"counted":   {body: "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n", tokens: 1},
		"cut off":   {body: "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n", err: ErrNoDone},
		"error":     {body: "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"error\":{\"message\":\"worker died\"}}\n\n", err: ErrServerEvent},
		"empty":     {body: "data: [DONE]\n\n", err: ErrProtocol},
		"role only": {body: "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\ndata: [DONE]\n\n", err: ErrProtocol},
		// The model's end token came first: an answer, with no first token.
		"stopped at once": {body: "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n" +
			"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n" +
			"data: {\"choices\":[],\"usage\":{\"completion_tokens\":1}}\n\n" +
			"data: [DONE]\n\n", tokens: 1, noContent: true},
	} {
		var s Sample
		readStream(context.Background(), strings.NewReader(c.body), time.Now(), &s)
		if s.Err != c.err || (c.err == "" && (s.Tokens != c.tokens || len(s.ITL) != c.it || (s.TTFT > 0) == c.noContent || s.E2E < s.TTFT || s.E2E <= 0)) {
			t.Errorf("%s: got %+v, want err %q, %d tokens, %d gaps", name, s, c.err, c.tokens, c.it)
		}
	}
}

// TestRunAgainstBareServer drives the real bare server over every
// protocol and connection mode and checks the counts, never the timing.
func TestRunAgainstBareServer(t *testing.T) {
	mix, _ := ParseUrgencyMix("0:1,3:1")
	runAgainstBareServer(t, map[string]Config{
		"h3 closed":    {Proto: ProtoH3, Concurrency: 4, Requests: 20, Urgency: mix},
		"h2 closed":    {Proto: ProtoH2, Concurrency: 4, Requests: 20},
		"h1 closed":    {Proto: ProtoH1, Concurrency: 4, Requests: 20},
		"h3 open loop": {Proto: ProtoH3, Concurrency: 64, Rate: 400, Requests: 20},
		"h3 new conn":  {Proto: ProtoH3, NewConnection: true, Requests: 6},
	})
}

// runAgainstBareServer runs each configuration against a real bare server
// on loopback and checks every request, token and gap was counted.
func runAgainstBareServer(t *testing.T, cases map[string]Config) {
	t.Helper()
	addr, pool := startBare(t)
	for name, cfg := range cases {
		cfg.URL = "https://" + addr
		cfg.TLS = &tls.Config{RootCAs: pool}
		cfg.OutputTokens = Dist{Kind: DistFixed, A: 7}
		cfg.Timeout = 30 * time.Second
		var calls int
		res, err := Run(context.Background(), cfg, func(p Progress) { calls++ })
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var b bytes.Buffer
		res.WriteTable(&b)
		if res.Requests != cfg.Requests || res.OK != cfg.Requests || res.Tokens != 7*cfg.Requests || res.ITL.Count != 6*cfg.Requests {
			t.Errorf("%s: got %d requests, %d ok, %d tokens, %d gaps; want %d, all ok, 7 tokens and 6 gaps each\n%s",
				name, res.Requests, res.OK, res.Tokens, res.ITL.Count, cfg.Requests, b.String())
		}
		if calls == 0 {
			t.Errorf("%s: progress was never reported", name)
		}
	}
}

func TestValidate(t *testing.T) {
	err := Config{URL: "http://x", Proto: "h4", ZeroRTT: true}.Validate()
	for _, want := range []string{"url:", "proto:", "requests:", "0rtt:"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("got %v, want it to name %s", err, want)
		}
	}
}

// startBare starts the real bare server on loopback for the test and
// returns its address and the pool that trusts it.
func startBare(t *testing.T) (string, *x509.CertPool) {
	t.Helper()
	dev, err := certs.EnsureDev(filepath.Join(t.TempDir(), "certs"), certs.DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	kp, err := certs.LoadKeyPair(dev.CertFile, dev.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := certs.LoadPool(dev.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := bareserver.Start(bareserver.Config{Listen: "127.0.0.1:0", TLS: &tls.Config{Certificates: []tls.Certificate{kp}}, ZeroRTT: true}, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv.Addr(), pool
}

// TestRunCountsRefusals drives a real HTTP/3 server that refuses every
// request, as an overloaded gateway does, and checks the refusals are
// timed to their headers and their Retry-After kept.
func TestRunCountsRefusals(t *testing.T) {
	dir := t.TempDir()
	dev, err := certs.EnsureDev(filepath.Join(dir, "certs"), certs.DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	kp, err := certs.LoadKeyPair(dev.CertFile, dev.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := certs.LoadPool(dev.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http3.Server{
		TLSConfig: http3.ConfigureTLSConfig(&tls.Config{Certificates: []tls.Certificate{kp}}),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.Header.Get("Priority") {
			case "u=0": // refused without saying when to come back
				w.WriteHeader(http.StatusTooManyRequests)
			default:
				w.Header().Set("Retry-After", "2")
				w.WriteHeader(http.StatusServiceUnavailable)
			}
			w.Write([]byte(`{"error":{"message":"overloaded","code":"overloaded"}}`))
		}),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(pc) }()
	defer func() {
		srv.Close()
		<-served
		pc.Close()
	}()
	mix, _ := ParseUrgencyMix("0:1,3:3")
	res, err := Run(context.Background(), Config{
		URL: "https://" + pc.LocalAddr().String(), TLS: &tls.Config{RootCAs: pool},
		Concurrency: 2, Requests: 40, Urgency: mix, Timeout: 10 * time.Second,
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var u0 int
	for _, s := range res.Samples {
		if s.Urgency == 0 {
			u0++
		}
	}
	if res.OK != 0 || res.Refused.Count != 40 || res.Errors["status_503"]+res.Errors["status_429"] != 40 {
		t.Errorf("got %d ok, %d refused, errors %v; want every one of 40 refused", res.OK, res.Refused.Count, res.Errors)
	}
	if res.RetryAfter[2] != 40-u0 || res.RetryAfter[-1] != u0 {
		t.Errorf("retry-after counts: got %v, want 2s ×%d and none ×%d", res.RetryAfter, 40-u0, u0)
	}
	if res.Refused.P50 <= 0 || res.Refused.Max < res.Refused.P99 || res.Refused.Max > 10*time.Second {
		t.Errorf("refusal latency: got %+v, want positive and ordered", res.Refused)
	}
	// Clients that honour Retry-After (2s here) send one request each in
	// a second, not as many as the server can refuse.
	polite, err := Run(context.Background(), Config{
		URL: "https://" + pc.LocalAddr().String(), TLS: &tls.Config{RootCAs: pool},
		Concurrency: 2, Duration: time.Second, Timeout: 10 * time.Second, HonourRetryAfter: true,
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if polite.Requests != 2 {
		t.Errorf("two clients honouring a Retry-After of 2s sent %d requests in a second, want 2", polite.Requests)
	}
	var b strings.Builder
	res.WriteTable(&b)
	for _, want := range []string{"refused", "retry-after of 40 refusals: none ×"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
}
