package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go/http3"

	"h3infer/certs"
	"h3infer/client"
	"h3infer/tlsbind"
)

// issueBound mints a bind=required credential with `h3infer token issue`
// from the server's own signing keys.
func (s *server) issueBound(t *testing.T) string {
	t.Helper()
	out, err := exec.Command(buildBinary(t), "token", "issue", "--state-dir", s.stateDir, "--tenant", "native", "--bind", "required").Output()
	if err != nil {
		t.Fatalf("token issue: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// earlyDataProbe sends requests over plain HTTP/3 (1-RTT, no binding
// proof) with the given bearer and Early-Data: 1, as whoever lifted a
// bearer token off a log would.
type earlyDataProbe struct {
	t      *testing.T
	s      *server
	c      *http.Client
	bearer string
}

func newEarlyDataProbe(t *testing.T, s *server, bearer string) *earlyDataProbe {
	pool, err := certs.LoadPool(s.caFile)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http3.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	t.Cleanup(func() { tr.Close() })
	return &earlyDataProbe{t: t, s: s, c: &http.Client{Transport: tr, Timeout: 30 * time.Second}, bearer: bearer}
}

// send returns the status, the error code of a refusal and whether the
// response says it was served as early data.
func (p *earlyDataProbe) send(method, path string, body []byte) (status int, code string, early bool) {
	p.t.Helper()
	req, err := http.NewRequest(method, p.s.base+path, bytes.NewReader(body))
	if err != nil {
		p.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+p.bearer)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Early-Data", "1")
	resp, err := p.c.Do(req)
	if err != nil {
		p.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var e struct {
		Error struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	json.Unmarshal(b, &e)
	return resp.StatusCode, e.Error.Code, resp.Header.Get("H3infer-Early-Data") == "1"
}

// boundClient is the client package holding cred, binding each request to
// its connection; it sends in 1-RTT only, the case the attack imitates.
func (s *server) boundClient(t *testing.T, cred string) *client.Client {
	t.Helper()
	pool, err := certs.LoadPool(s.caFile)
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.New(client.Config{TLS: &tls.Config{RootCAs: pool}, Credential: cred, Disable0RTT: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func doBound(t *testing.T, c *client.Client, method, url string, header http.Header, body []byte) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := c.Do(ctx, method, url, header, body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}

func writeServeConfig(t *testing.T, c map[string]any) string {
	t.Helper()
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestEarlyDataHeaderCannotSkipBinding: a client's own Early-Data: 1 header
// used to send a request down the early path, which skips the binding
// check, so a lifted bind=required token worked without its secret: the
// model list, and with zero_rtt.routes serve a whole completion. Against
// the real serve, both are now refused while the token's holder, binding
// its connection, is served beside them.
func TestEarlyDataHeaderCannotSkipBinding(t *testing.T) {
	s := startServer(t, "--workers", "1", "--config", writeServeConfig(t, map[string]any{
		"zero_rtt": map[string]any{"routes": map[string]string{"/v1/chat/completions": "serve"}},
	}))
	cred := s.issueBound(t)
	bearer, _, err := tlsbind.SplitCredential(cred)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(chatBody(8, false))
	started := metric(t, s, "h3infer_worker_sequences_started_total")

	attacker := newEarlyDataProbe(t, s, bearer)
	if status, code, _ := attacker.send(http.MethodGet, "/v1/models", nil); status != 401 || code != "binding_failed" {
		t.Errorf("lifted bind=required token, GET /v1/models with Early-Data: 1: %d %s, want 401 binding_failed", status, code)
	}
	if status, code, _ := attacker.send(http.MethodPost, "/v1/chat/completions", body); status != 401 || code != "binding_failed" {
		t.Errorf("lifted bind=required token, completion (policy serve) with Early-Data: 1: %d %s, want 401 binding_failed", status, code)
	}
	if got := metric(t, s, "h3infer_early_data_header_ignored_total"); got != 2 {
		t.Errorf("ignored Early-Data headers = %v, want 2", got)
	}

	// The holder of the credential, header or not.
	holder := s.boundClient(t, cred)
	if status, b := doBound(t, holder, http.MethodGet, s.base+"/v1/models", http.Header{"Early-Data": {"1"}}, nil); status != 200 {
		t.Errorf("holder, GET /v1/models: %d, want 200\n%s", status, b)
	}
	if status, b := doBound(t, holder, http.MethodPost, s.base+"/v1/chat/completions", http.Header{"Content-Type": {"application/json"}}, body); status != 200 || !strings.Contains(b, `"chat.completion"`) {
		t.Errorf("holder, completion: %d, want 200 with a completion\n%s", status, b)
	}
	// The worker reports its counters every stats interval, the holder's
	// sequence and any before it in one cumulative count: wait for the
	// report that covers the holder's, then only it may have run.
	for deadline := time.Now().Add(5 * time.Second); metric(t, s, "h3infer_worker_sequences_started_total") < started+1 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	if got := metric(t, s, "h3infer_worker_sequences_started_total"); got != started+1 {
		t.Errorf("worker sequences started went from %v to %v, want one more (the holder's): the refused completion ran", started, got)
	}
}

// TestEarlyDataHeaderFromTrustedProxy: with zero_rtt.trusted_proxies
// covering the peer, its Early-Data: 1 is believed for a bind=optional
// token, but a bind=required token cannot be verified through an
// intermediary (the exporter is the intermediary's connection's) and is
// refused, proof or not.
func TestEarlyDataHeaderFromTrustedProxy(t *testing.T) {
	s := startServer(t, "--workers", "1", "--config", writeServeConfig(t, map[string]any{
		"zero_rtt": map[string]any{"trusted_proxies": []string{"127.0.0.1"}},
	}))
	if status, _, early := newEarlyDataProbe(t, s, s.bearer(t)).send(http.MethodGet, "/v1/models", nil); status != 200 || !early {
		t.Errorf("bind=optional, GET /v1/models with Early-Data: 1 from a trusted proxy: %d early=%v, want 200 served early", status, early)
	}
	cred := s.issueBound(t)
	bearer, _, err := tlsbind.SplitCredential(cred)
	if err != nil {
		t.Fatal(err)
	}
	if status, code, _ := newEarlyDataProbe(t, s, bearer).send(http.MethodGet, "/v1/models", nil); status != 401 || code != "binding_failed" {
		t.Errorf("bind=required without proof from a trusted proxy: %d %s, want 401 binding_failed", status, code)
	}
	holder := s.boundClient(t, cred)
	if status, b := doBound(t, holder, http.MethodGet, s.base+"/v1/models", http.Header{"Early-Data": {"1"}}, nil); status != 401 || !strings.Contains(b, "binding_failed") {
		t.Errorf("bind=required with a binding proof, marked Early-Data: 1 from a trusted proxy: %d, want 401 binding_failed\n%s", status, b)
	}
	if status, b := doBound(t, holder, http.MethodGet, s.base+"/v1/models", nil, nil); status != 200 {
		t.Errorf("bind=required with its binding proof, not marked early: %d, want 200\n%s", status, b)
	}
	if got := metric(t, s, "h3infer_early_data_header_ignored_total"); got != 0 {
		t.Errorf("ignored Early-Data headers = %v, want 0 from a trusted peer", got)
	}
}
