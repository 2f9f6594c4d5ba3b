package gateway

import (
	"crypto/tls"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestAdminNonLoopbackNeedsToken(t *testing.T) {
	cert, _ := selfSigned(t)
	for _, addr := range []string{"0.0.0.0:0", ":0", "192.0.2.1:9090"} {
		_, err := New(Config{
			Listen:   "127.0.0.1:0",
			Admin:    addr,
			TLS:      &tls.Config{Certificates: []tls.Certificate{cert}},
			Registry: prometheus.NewRegistry(),
		}, &fakeScheduler{}, &fakeCatalog{}, slog.New(slog.DiscardHandler))
		if err == nil || !strings.Contains(err.Error(), "gateway.admin") {
			t.Errorf("admin %s without a token: err %v, want a gateway.admin error", addr, err)
		}
	}
}

func TestAdminRoutes(t *testing.T) {
	const token = "s3cret-admin"
	h := newHarness(t, func(c *Config) {
		c.AdminToken = token
		c.Status = func() any { return map[string]int{"queued": 7} }
	})
	get := func(path, auth string) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, h.admin+path, nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	// Probes stay open for load balancers.
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, _ := get(p, ""); code != http.StatusOK {
			t.Errorf("%s without token: %d, want 200", p, code)
		}
	}
	for _, p := range []string{"/metrics", "/debug/state", "/debug/pprof/", "/debug/pprof/cmdline"} {
		if code, _ := get(p, ""); code != http.StatusUnauthorized {
			t.Errorf("%s without token: %d, want 401", p, code)
		}
		if code, _ := get(p, "Bearer wrong"); code != http.StatusUnauthorized {
			t.Errorf("%s with a wrong token: %d, want 401", p, code)
		}
		if code, body := get(p, "Bearer "+token); code != http.StatusOK {
			t.Errorf("%s with the token: %d, want 200: %s", p, code, body)
		}
	}
	_, body := get("/debug/state", "Bearer "+token)
	var state struct {
		Ready  bool `json:"ready"`
		Models []struct {
			Name string
		} `json:"models"`
		Status map[string]int `json:"status"`
	}
	if err := json.Unmarshal([]byte(body), &state); err != nil {
		t.Fatalf("/debug/state: %v: %s", err, body)
	}
	if !state.Ready || len(state.Models) != 2 || state.Models[0].Name != "demo" || state.Status["queued"] != 7 {
		t.Errorf("/debug/state = %s", body)
	}
	if _, body := get("/debug/pprof/", "Bearer "+token); !strings.Contains(body, "goroutine") {
		t.Errorf("/debug/pprof/ index lacks profiles: %.200s", body)
	}
}
