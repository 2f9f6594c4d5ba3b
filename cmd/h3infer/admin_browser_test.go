package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestBrowserCannotDriveAdmin: a page in a local browser used to roll back
// a model through the admin listener with a no-cors text/plain POST, and
// after DNS rebinding read /debug/state. Headless Chromium runs both
// attacks against the real serve; nothing changes, the listener counts
// every attempt as refused, and the `h3infer models` command beside it
// still rolls back.
func TestBrowserCannotDriveAdmin(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is not installed; .ci/run installs it (apt-get install chromium)")
	}
	repo := t.TempDir()
	writeVersion(t, repo, "1", 0)
	cfg := filepath.Join(t.TempDir(), "config.json")
	os.WriteFile(cfg, fmt.Appendf(nil, `{"model_repository": {"dir": %q, "poll": "200ms"}}`, repo), 0o600)
	s := startServer(t, "--config", cfg)
	writeVersion(t, repo, "2", 7)
	waitFor(t, "version 2 to take over from 1", func() bool {
		st := modelAdminStatus(t, s)
		return st.Primary == "2" && st.Previous == "1"
	})

	// The attacker's page: another origin on this machine.
	evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		io.WriteString(w, "<!doctype html><title>cat pictures</title><p>nothing to see</p>\n")
	}))
	defer evil.Close()
	_, adminPort, _ := net.SplitHostPort(strings.TrimPrefix(s.admin, "http://"))

	originBefore := metric(t, s, `h3infer_admin_refusals_total{reason="origin"}`)
	hostBefore := metric(t, s, `h3infer_admin_refusals_total{reason="host"}`)
	actions := []map[string]any{
		{"action": "rollback"},
		{"action": "promote", "version": "1"},
		{"action": "canary", "version": "1", "percent": 50},
		{"action": "unload", "version": "1"},
		{"action": "load", "version": "1"},
	}
	raw := runNode(t, "adminattack.mjs", map[string]any{
		"chromium": browser, "page": evil.URL + "/", "admin": s.admin, "model": "demo", "actions": actions,
		"rebound": "http://evil.example:" + adminPort + "/debug/state",
	})
	var out struct {
		PageOrigin string `json:"pageOrigin"`
		Attempts   []struct {
			How    string `json:"how"`
			Type   string `json:"type"`
			Status int    `json:"status"`
			Error  string `json:"error"`
		} `json:"attempts"`
		Seen []struct {
			Method string `json:"method"`
			Status int    `json:"status"`
		} `json:"seen"`
		Rebound struct {
			Status int    `json:"status"`
			Body   string `json:"body"`
		} `json:"rebound"`
		PageErrors []string `json:"pageErrors"`
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("adminattack.mjs output: %v\n%s", err, raw)
	}
	t.Logf("page %s: attempts %+v; the browser saw %+v", out.PageOrigin, out.Attempts, out.Seen)
	if out.PageOrigin != evil.URL || len(out.Attempts) != len(actions)+1 {
		t.Fatalf("the page did not run as planned: %s", raw)
	}

	st := modelAdminStatus(t, s)
	var loaded []string
	for _, l := range st.Loaded {
		loaded = append(loaded, l.Version)
	}
	if st.Primary != "2" || st.Previous != "1" || st.Canary != "" || !slices.Contains(loaded, "1") {
		t.Errorf("the page changed the models: primary %q previous %q canary %q loaded %v; want 2, 1, none, 1 still loaded",
			st.Primary, st.Previous, st.Canary, loaded)
	}
	// Each attempt reached the listener and was refused there (the CORS
	// one at its preflight), not lost on the way: a test whose requests
	// never arrived would prove nothing.
	if got := metric(t, s, `h3infer_admin_refusals_total{reason="origin"}`) - originBefore; got != float64(len(actions)+1) {
		t.Errorf("cross-origin refusals counted: %v, want %d", got, len(actions)+1)
	}

	// DNS rebinding: the page's origin is now evil.example at the admin
	// port, so the browser would hand it whatever came back.
	if out.Rebound.Status != http.StatusMisdirectedRequest || strings.Contains(out.Rebound.Body, "workers") {
		t.Errorf("rebound page read /debug/state: status %d: %.300s", out.Rebound.Status, out.Rebound.Body)
	}
	if got := metric(t, s, `h3infer_admin_refusals_total{reason="host"}`) - hostBefore; got < 1 {
		t.Errorf("misdirected-host refusals counted: %v, want the rebound request", got)
	}

	// The operator's command still works beside it.
	if _, err := modelsCmd(t, s, "rollback", "demo"); err != nil {
		t.Fatalf("h3infer models rollback: %v", err)
	}
	if st := modelAdminStatus(t, s); st.Primary != "1" {
		t.Errorf("after the CLI's rollback: primary %q, want 1", st.Primary)
	}
}
