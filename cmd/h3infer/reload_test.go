package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go/http3"

	"h3infer/certs"
)

// outcome is how one streamed request ended, as a client sees it.
type outcome struct {
	tokens   int
	done     bool   // ended with [DONE]
	errEvent string // the error event's code, if it ended with one
	err      error  // the request failed outright
}

func (o outcome) String() string {
	return fmt.Sprintf("tokens=%d done=%v error_event=%q err=%v", o.tokens, o.done, o.errEvent, o.err)
}

// streamOutcome streams one completion and reports how it ended; first, when
// not nil, is closed at the first token.
func streamOutcome(ctx context.Context, c *http.Client, base string, maxTokens int, first chan<- struct{}) outcome {
	body, _ := json.Marshal(chatBody(maxTokens, true))
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/chat/completions", strings.NewReader(string(body)))
	if err != nil {
		return outcome{err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return outcome{err: err}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return outcome{err: fmt.Errorf("status %s", resp.Status)}
	}
	var o outcome
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			o.done = true
			continue
		}
		var ev struct {
			Error *struct {
				Code string `json:"code"`
			} `json:"error"`
			Choices []struct {
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(data), &ev); err != nil {
			o.err = err
			return o
		}
		if ev.Error != nil {
			o.errEvent = ev.Error.Code
			continue
		}
		for _, ch := range ev.Choices {
			if ch.Delta.Content != "" {
				o.tokens++
				if o.tokens == 1 && first != nil {
					close(first)
				}
			}
		}
	}
	o.err = sc.Err()
	return o
}

// replaceFile swaps a file by rename, as deployment tools do.
func replaceFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	tmp := to + ".new"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, to); err != nil {
		t.Fatal(err)
	}
}

func writeConfigFile(t *testing.T, path string, cfg map[string]any) {
	t.Helper()
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// waitLog waits for the server's log to contain want n times.
func waitLog(t *testing.T, s *server, want string, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for strings.Count(s.stderr.String(), want) < n {
		if time.Now().After(deadline) {
			t.Fatalf("the log never said %q (%d times)\n%s", want, n, s.stderr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestReloadsAndDrainDropNoStream runs the real binary under a steady stream
// of requests while its certificate files are replaced, its configuration
// is reloaded (once validly, once not) and it is drained with SIGTERM: no
// request accepted before a signal fails; past the grace a stream ends with
// an explicit error event; the process exits 0.
func TestReloadsAndDrainDropNoStream(t *testing.T) {
	dir := t.TempDir()
	oldPair, err := certs.EnsureDev(filepath.Join(dir, "old"), certs.DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	newPair, err := certs.EnsureDev(filepath.Join(dir, "new"), certs.DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	replaceFile(t, oldPair.CertFile, certFile)
	replaceFile(t, oldPair.KeyFile, keyFile)
	cfgPath := filepath.Join(dir, "h3infer.json")
	cfg := map[string]any{
		// 20 ms a token: a 300-token stream runs for about 6 s.
		"models":  []map[string]any{{"name": "demo", "dir": "synthetic:20ms"}},
		"workers": map[string]any{"slots": 16},
		"tls":     map[string]any{"cert_file": certFile, "key_file": keyFile, "watch_interval": "50ms"},
		"gateway": map[string]any{"shutdown_grace": "30s"},
	}
	writeConfigFile(t, cfgPath, cfg)
	s := startServer(t, "--config", cfgPath)

	pool := x509.NewCertPool()
	for _, ca := range []string{oldPair.CAFile, newPair.CAFile} {
		p, _ := os.ReadFile(ca)
		pool.AppendCertsFromPEM(p)
	}
	newClient := func() (*http.Client, *http3.Transport) {
		tr := &http3.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
		return &http.Client{Transport: s.withBearer(t, tr), Timeout: 90 * time.Second}, tr
	}
	long, longTr := newClient()
	defer longTr.Close()
	ctx := context.Background()

	// The long stream that must survive the certificate and config reloads.
	longFirst := make(chan struct{})
	longDone := make(chan outcome, 1)
	go func() { longDone <- streamOutcome(ctx, long, s.base, 300, longFirst) }()
	<-longFirst

	// A steady load of short streams, each on the shared connection.
	steady, steadyTr := newClient()
	defer steadyTr.Close()
	stopSteady := make(chan struct{})
	var steadyWG sync.WaitGroup
	var steadyOK atomic.Int64
	var steadyFailed sync.Map
	steadyWG.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stopSteady:
				return
			default:
			}
			if o := streamOutcome(ctx, steady, s.base, 10, nil); !o.done || o.err != nil || o.errEvent != "" {
				steadyFailed.Store(i, o.String())
			} else {
				steadyOK.Add(1)
			}
		}
	})

	// Certificate swap: new connections see the new leaf.
	replaceFile(t, newPair.KeyFile, keyFile)
	replaceFile(t, newPair.CertFile, certFile)
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, tr := newClient()
		req, _ := http.NewRequest(http.MethodGet, s.base+"/v1/models", nil)
		resp, err := c.Do(req)
		tr.Close()
		if err != nil {
			t.Fatalf("a new connection during the swap failed: %v", err)
		}
		resp.Body.Close()
		if certs.SPKIPin(resp.TLS.PeerCertificates[0]) == newPair.SPKI {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("new connections still get the old certificate 30s after the swap")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// A valid reload, then an invalid one that is refused.
	cfg["scheduler"] = map[string]any{"tenants": []map[string]any{{"name": "default", "weight": 2}}}
	writeConfigFile(t, cfgPath, cfg)
	s.cmd.Process.Signal(syscall.SIGHUP)
	waitLog(t, s, "config reloaded", 1)
	cfg["scheduler"] = map[string]any{"tenants": []map[string]any{{"name": "default", "weight": 5000}}}
	writeConfigFile(t, cfgPath, cfg)
	s.cmd.Process.Signal(syscall.SIGHUP)
	waitLog(t, s, "config reload refused", 1)
	if !strings.Contains(s.stderr.String(), "scheduler.tenants[0].weight") {
		t.Errorf("the refusal does not name the key at fault:\n%s", s.stderr)
	}
	// Still serving, still on the new certificate.
	if o := streamOutcome(ctx, steady, s.base, 5, nil); !o.done {
		t.Errorf("after a refused reload: %v", o)
	}

	if o := <-longDone; !o.done || o.tokens != 300 || o.err != nil {
		t.Errorf("the long stream across the reloads: %v, want 300 tokens and [DONE]", o)
	}
	close(stopSteady)
	steadyWG.Wait()
	steadyFailed.Range(func(k, v any) bool {
		t.Errorf("steady request %v failed: %v", k, v)
		return true
	})
	if steadyOK.Load() == 0 {
		t.Error("no steady request completed")
	}

	// Drain: a short grace (a live setting) so that one stream finishes
	// within it and a long one outlives it.
	cfg["scheduler"] = map[string]any{"tenants": []map[string]any{{"name": "default", "weight": 2}}}
	cfg["gateway"] = map[string]any{"shutdown_grace": "1500ms"}
	writeConfigFile(t, cfgPath, cfg)
	s.cmd.Process.Signal(syscall.SIGHUP)
	waitLog(t, s, "config reloaded", 2)
	shortFirst, longFirst2 := make(chan struct{}), make(chan struct{})
	shortDone, long2Done := make(chan outcome, 1), make(chan outcome, 1)
	go func() { shortDone <- streamOutcome(ctx, long, s.base, 30, shortFirst) }()
	go func() { long2Done <- streamOutcome(ctx, long, s.base, 1000, longFirst2) }()
	<-shortFirst
	<-longFirst2
	s.cmd.Process.Signal(syscall.SIGTERM)
	if o := <-shortDone; !o.done || o.tokens != 30 {
		t.Errorf("a stream that fits in the grace: %v, want 30 tokens and [DONE]", o)
	}
	o := <-long2Done
	if o.done || o.errEvent != "shutting_down" || o.err != nil {
		t.Errorf("a stream past the grace: %v, want an error event shutting_down and no [DONE]", o)
	}
	select {
	case <-s.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("serve did not exit after draining\n%s", s.stderr)
	}
	if s.exitErr != nil && !errors.Is(s.exitErr, os.ErrProcessDone) {
		t.Errorf("serve exited with %v, want 0\n%s", s.exitErr, s.stderr)
	}
}

// TestReloadRateLimits changes a running gateway's rate limits with SIGHUP:
// from none to a tiny request rate (the next requests get 429 with
// Retry-After), an invalid limit refused with the old one kept, and back to
// none. The model repository's auto_promote changes in the same reload and,
// like the limits, is not reported as needing a restart.
func TestReloadRateLimits(t *testing.T) {
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "h3infer.json")
	cfg := map[string]any{
		"models": []map[string]any{{"name": "demo", "dir": "synthetic:1ms"}},
	}
	writeConfigFile(t, cfgPath, cfg)
	s := startServer(t, "--config", cfgPath)
	c := s.h3Client(t)
	post := func() *http.Response {
		t.Helper()
		body, _ := json.Marshal(chatBody(2, false))
		resp, err := c.Post(s.base+"/v1/chat/completions", "application/json", strings.NewReader(string(body)))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	want := func(what string, status int) *http.Response {
		t.Helper()
		resp := post()
		if resp.StatusCode != status {
			t.Fatalf("%s: status %d, want %d\n%s", what, resp.StatusCode, status, s.stderr)
		}
		return resp
	}
	for range 3 {
		want("no limits", http.StatusOK)
	}
	reloads := 0
	hup := func(wantLog string) {
		t.Helper()
		if wantLog == "config reloaded" {
			reloads++
		}
		writeConfigFile(t, cfgPath, cfg)
		s.cmd.Process.Signal(syscall.SIGHUP)
	}

	// One request per 100 s: the first passes, the next is refused.
	cfg["rate_limits"] = map[string]any{"default": map[string]any{"requests_per_second": 0.01, "request_burst": 1}}
	cfg["model_repository"] = map[string]any{"auto_promote": true}
	hup("config reloaded")
	waitLog(t, s, "config reloaded", reloads)
	lines := strings.Split(s.stderr.String(), "\n")
	for _, l := range lines {
		if strings.Contains(l, "config reloaded") && (strings.Contains(l, "rate_limits") || strings.Contains(l, "model_repository")) {
			t.Errorf("a live setting reported as needing a restart: %s", l)
		}
	}
	want("first under the new limit", http.StatusOK)
	resp := want("second under the new limit", http.StatusTooManyRequests)
	if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || s < 1 {
		t.Errorf("Retry-After %q, want whole seconds >= 1", resp.Header.Get("Retry-After"))
	}

	// An invalid limit: the whole reload is refused, naming the key, and
	// the running limit stays.
	cfg["rate_limits"] = map[string]any{"default": map[string]any{"requests_per_second": -1}}
	hup("config reload refused")
	waitLog(t, s, "config reload refused", 1)
	if !strings.Contains(s.stderr.String(), "rate_limits.default.requests_per_second") {
		t.Errorf("the refusal does not name the key at fault:\n%s", s.stderr)
	}
	want("after the refused reload", http.StatusTooManyRequests)

	// Back to no limits.
	delete(cfg, "rate_limits")
	hup("config reloaded")
	waitLog(t, s, "config reloaded", reloads)
	for range 3 {
		want("limits removed", http.StatusOK)
	}
}
