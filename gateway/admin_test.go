package gateway

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
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

// recordingModelAdmin counts the state changes that reached it.
type recordingModelAdmin struct {
	mu      sync.Mutex
	actions []string
}

func (m *recordingModelAdmin) record(a string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.actions = append(m.actions, a)
	return nil
}

func (m *recordingModelAdmin) done() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.actions)
}

func (m *recordingModelAdmin) ModelStatus() any { return []string{} }
func (m *recordingModelAdmin) LoadVersion(_ context.Context, _, v string) error {
	return m.record("load " + v)
}
func (m *recordingModelAdmin) UnloadVersion(_ context.Context, _, v string) error {
	return m.record("unload " + v)
}
func (m *recordingModelAdmin) Promote(_ context.Context, _, v string) error {
	return m.record("promote " + v)
}
func (m *recordingModelAdmin) Canary(_ context.Context, _, v string, _ float64) error {
	return m.record("canary " + v)
}
func (m *recordingModelAdmin) Rollback(context.Context, string) error { return m.record("rollback") }

// TestAdminGuard sends what a web page in a local browser can make it send
// (a simple cross-origin POST, a request after DNS rebinding) beside what
// the CLI, Prometheus and curl send, and checks that only the latter are
// served and that nothing refused reached the model admin.
func TestAdminGuard(t *testing.T) {
	adm := &recordingModelAdmin{}
	reg := prometheus.NewRegistry()
	h := newHarness(t, func(c *Config) {
		c.ModelAdmin = adm
		c.Registry = reg
		c.AdminHosts = []string{"gw1.internal"}
	})
	self := strings.TrimPrefix(h.admin, "http://")
	_, port, _ := net.SplitHostPort(self)
	const rollback = `{"action":"rollback"}`
	asJSON := map[string]string{"Content-Type": "application/json"}
	with := func(kv ...string) map[string]string {
		m := map[string]string{"Content-Type": "application/json"}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	for name, c := range map[string]struct {
		method, path, host string
		header             map[string]string
		body               string
		want               int
	}{
		"cli rollback":              {"POST", "/admin/models/demo", self, asJSON, rollback, 200},
		"cli rollback charset":      {"POST", "/admin/models/demo", self, map[string]string{"Content-Type": "application/json; charset=utf-8"}, rollback, 200},
		"localhost":                 {"POST", "/admin/models/demo", "localhost:" + port, asJSON, rollback, 200},
		"other loopback ip":         {"POST", "/admin/models/demo", "127.0.0.2:" + port, asJSON, rollback, 200},
		"ipv6 loopback":             {"POST", "/admin/models/demo", "[::1]:" + port, asJSON, rollback, 200},
		"configured name":           {"POST", "/admin/models/demo", "gw1.internal:80", asJSON, rollback, 200},
		"same-origin fetch":         {"POST", "/admin/models/demo", self, with("Origin", "http://"+self, "Sec-Fetch-Site", "same-origin"), rollback, 200},
		"prometheus scrape":         {"GET", "/metrics", self, nil, "", 200},
		"typed url bar":             {"GET", "/debug/state", self, map[string]string{"Sec-Fetch-Site": "none"}, "", 200},
		"text/plain no-cors":        {"POST", "/admin/models/demo", self, map[string]string{"Content-Type": "text/plain"}, rollback, 415},
		"form post":                 {"POST", "/admin/models/demo", self, map[string]string{"Content-Type": "application/x-www-form-urlencoded"}, rollback, 415},
		"no content type":           {"POST", "/admin/models/demo", self, nil, rollback, 415},
		"json look-alike":           {"POST", "/admin/models/demo", self, map[string]string{"Content-Type": "application/jsonp"}, rollback, 415},
		"evil origin and host":      {"POST", "/admin/models/demo", "evil.example", with("Origin", "http://evil.example"), rollback, 421},
		"evil origin":               {"POST", "/admin/models/demo", self, with("Origin", "http://evil.example"), rollback, 403},
		"other local port origin":   {"POST", "/admin/models/demo", self, with("Origin", "http://127.0.0.1:1"), rollback, 403},
		"null origin":               {"POST", "/admin/models/demo", self, with("Origin", "null"), rollback, 403},
		"same-site":                 {"POST", "/admin/models/demo", self, with("Sec-Fetch-Site", "same-site"), rollback, 403},
		"cross-site get":            {"GET", "/debug/state", self, map[string]string{"Sec-Fetch-Site": "cross-site"}, "", 403},
		"rebinding state":           {"GET", "/debug/state", "evil.example", nil, "", 421},
		"rebinding state with port": {"GET", "/debug/state", "evil.example:" + port, nil, "", 421},
		"rebinding metrics":         {"GET", "/metrics", "evil.example:" + port, nil, "", 421},
		"rebinding pprof":           {"GET", "/debug/pprof/cmdline", "evil.example:" + port, nil, "", 421},
		"rebinding models":          {"GET", "/admin/models", "evil.example:" + port, nil, "", 421},
		"loopback on another port":  {"GET", "/debug/state", "127.0.0.1:1", nil, "", 421},
		"localhost on another port": {"GET", "/debug/state", "localhost:1", nil, "", 421},
		"non-loopback ip":           {"GET", "/debug/state", "192.0.2.1:" + port, nil, "", 421},
		"probe under any name":      {"GET", "/healthz", "lb.example", nil, "", 200},
		"localhost lookalike":       {"GET", "/debug/state", "localhost.evil.example:" + port, nil, "", 421},
	} {
		t.Run(name, func(t *testing.T) {
			before := len(adm.done())
			req, err := http.NewRequest(c.method, h.admin+c.path, strings.NewReader(c.body))
			if err != nil {
				t.Fatal(err)
			}
			req.Host = c.host
			for k, v := range c.header {
				req.Header.Set(k, v)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != c.want {
				t.Fatalf("got %d, want %d: %s", resp.StatusCode, c.want, b)
			}
			ran := len(adm.done()) > before
			if c.method == "POST" && ran != (c.want == 200) {
				t.Errorf("the rollback ran: %v, want %v", ran, c.want == 200)
			}
			if c.want >= 400 {
				var e struct {
					Error struct {
						Code string `json:"code"`
					} `json:"error"`
				}
				if err := json.Unmarshal(b, &e); err != nil || e.Error.Code == "" {
					t.Errorf("refusal not in the API's error shape: %v: %s", err, b)
				}
			}
		})
	}
	for reason, want := range map[string]float64{"host": 10, "origin": 5, "content_type": 4} {
		if got := adminRefusals(t, reg, reason); got != want {
			t.Errorf("h3infer_admin_refusals_total{reason=%q} = %v, want %v", reason, got, want)
		}
	}
}

func adminRefusals(t *testing.T, reg *prometheus.Registry, reason string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "h3infer_admin_refusals_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == reason {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("h3infer_admin_refusals_total{reason=%q} is missing", reason)
	return 0
}

// TestAdminGuardWildcardHosts covers a listener bound to every address,
// which tests may not open: any IP literal on its port is accepted (a
// rebound name never arrives as one), names only when configured.
func TestAdminGuardWildcardHosts(t *testing.T) {
	g := newAdminGuard(":9090", "[::]:9090", []string{"Metrics.Internal"}, func(string) {})
	for host, want := range map[string]bool{
		"10.1.2.3:9090":         true,
		"[2001:db8::1]:9090":    true,
		"127.0.0.1:9090":        true,
		"localhost:9090":        true,
		"metrics.internal":      true,
		"METRICS.internal:8080": true,
		"10.1.2.3:9091":         false,
		"10.1.2.3":              false,
		"evil.example:9090":     false,
		"evil.example":          false,
		"":                      false,
	} {
		if got := g.hostAllowed(host); got != want {
			t.Errorf("Host %q: allowed %v, want %v", host, got, want)
		}
	}
}
