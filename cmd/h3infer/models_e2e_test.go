package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"h3infer/internal/onnxgen"
)

// writeVersion writes a demo model as version ver of "demo" in repo.
func writeVersion(t *testing.T, repo, ver string, seed int64) string {
	t.Helper()
	opts := onnxgen.DefaultOptions()
	if seed != 0 {
		opts.Random, opts.Seed = true, seed
	}
	return publishVersion(t, repo, "demo", ver, opts)
}

// publishVersion writes the model opts describe as version ver of model
// in repo, the way an operator should: into a temporary directory first,
// then renamed into place.
func publishVersion(t *testing.T, repo, model, ver string, opts onnxgen.Options) string {
	t.Helper()
	tmp := filepath.Join(repo, model, ".tmp-"+ver)
	if err := onnxgen.Write(tmp, opts); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(repo, model, ver)
	if err := os.Rename(tmp, dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

type modelStatus struct {
	Model    string            `json:"model"`
	Primary  string            `json:"primary"`
	Canary   string            `json:"canary"`
	Previous string            `json:"previous"`
	Failed   map[string]string `json:"failed"`
	Loaded   []struct {
		Version string `json:"version"`
	} `json:"loaded"`
}

func modelAdminStatus(t *testing.T, s *server) modelStatus {
	t.Helper()
	resp, err := http.Get(s.admin + "/admin/models")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st []modelStatus
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil || len(st) != 1 {
		t.Fatalf("status: %v, %+v", err, st)
	}
	return st[0]
}

// modelsCmd runs the `h3infer models` subcommand against s.
func modelsCmd(t *testing.T, s *server, args ...string) (string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	admin := strings.TrimPrefix(s.admin, "http://")
	code := run(append([]string{"models", "--admin", admin}, args...), &out, &errb)
	if code != 0 {
		return out.String(), fmt.Errorf("exit %d: %s", code, errb.String())
	}
	return out.String(), nil
}

// ask sends one small chat completion and returns the version that served
// it, or an error for any failure a user would see.
func ask(ctx context.Context, c *http.Client, s *server, user, pin string) (string, error) {
	body, _ := json.Marshal(map[string]any{
		"model": "demo", "messages": []map[string]string{{"role": "user", "content": testPrompt}},
		"max_tokens": 4, "stream": true, "user": user,
	})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.base+"/v1/chat/completions", bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/json")
	if pin != "" {
		req.Header.Set("H3infer-Model-Version", pin)
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("read body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %s: %s", resp.Status, b)
	}
	if !bytes.HasSuffix(bytes.TrimSpace(b), []byte("data: [DONE]")) || bytes.Contains(b, []byte(`"error"`)) {
		return "", fmt.Errorf("stream did not finish cleanly: %s", b)
	}
	return resp.Header.Get("H3infer-Model-Version"), nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestModelVersions runs the real binary with a watched repository: a new
// version swaps in under steady load with no failed request, a broken one
// is refused while the old one serves, then rollback, a version pin and a
// sticky canary through the `h3infer models` command.
func TestModelVersions(t *testing.T) {
	repo := t.TempDir()
	writeVersion(t, repo, "1", 0)
	cfg := filepath.Join(t.TempDir(), "config.json")
	os.WriteFile(cfg, fmt.Appendf(nil, `{"model_repository": {"dir": %q, "poll": "200ms"}}`, repo), 0o600)
	s := startServer(t, "--config", cfg)
	c := s.h3Client(t)
	ctx := t.Context()

	if v, err := ask(ctx, c, s, "", ""); err != nil || v != "1" {
		t.Fatalf("first request: version %q, %v; want 1", v, err)
	}

	// Steady load across the swap.
	var (
		stop     atomic.Bool
		failures atomic.Int64
		served   sync.Map // version -> *atomic.Int64
		wg       sync.WaitGroup
		firstErr atomic.Value
	)
	for i := range 4 {
		wg.Go(func() {
			for n := 0; !stop.Load(); n++ {
				v, err := ask(ctx, c, s, fmt.Sprintf("load-%d-%d", i, n), "")
				if err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				cnt, _ := served.LoadOrStore(v, new(atomic.Int64))
				cnt.(*atomic.Int64).Add(1)
			}
		})
	}
	count := func(v string) int64 {
		cnt, ok := served.Load(v)
		if !ok {
			return 0
		}
		return cnt.(*atomic.Int64).Load()
	}
	waitFor(t, "load on version 1", func() bool { return count("1") >= 20 })
	writeVersion(t, repo, "2", 7)
	waitFor(t, "version 2 to take over", func() bool { return count("2") >= 20 })

	// A broken version 3: its model.onnx is not a model.
	dir3 := filepath.Join(repo, "demo", ".tmp-3")
	os.MkdirAll(dir3, 0o755)
	for _, f := range []string{"model.json", "tokenizer.json"} {
		b, _ := os.ReadFile(filepath.Join(repo, "demo", "2", f))
		os.WriteFile(filepath.Join(dir3, f), b, 0o644)
	}
	os.WriteFile(filepath.Join(dir3, "model.onnx"), []byte("not an onnx file"), 0o644)
	os.Rename(dir3, filepath.Join(repo, "demo", "3"))
	waitFor(t, "version 3 to be refused", func() bool { return modelAdminStatus(t, s).Failed["3"] != "" })
	before := count("2")
	waitFor(t, "version 2 to keep serving", func() bool { return count("2") >= before+20 })
	stop.Store(true)
	wg.Wait()
	if n := failures.Load(); n != 0 {
		t.Fatalf("%d requests failed across the swap; first: %v", n, firstErr.Load())
	}
	st := modelAdminStatus(t, s)
	if st.Primary != "2" || st.Previous != "1" {
		t.Errorf("after the swap: primary %q previous %q, want 2 and 1", st.Primary, st.Previous)
	}
	t.Logf("served: v1 %d, v2 %d; v3 refused: %s", count("1"), count("2"), st.Failed["3"])

	// Rollback in one command; version 2 stays loaded and can be pinned.
	if _, err := modelsCmd(t, s, "rollback", "demo"); err != nil {
		t.Fatal(err)
	}
	if v, err := ask(ctx, c, s, "", ""); err != nil || v != "1" {
		t.Errorf("after rollback: version %q, %v; want 1", v, err)
	}
	if v, err := ask(ctx, c, s, "", "2"); err != nil || v != "2" {
		t.Errorf("pinned to 2: version %q, %v; want 2", v, err)
	}
	if _, err := ask(ctx, c, s, "", "9"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("pinned to a version not loaded: %v, want 404", err)
	}

	// A 30% canary: each user stays on one side.
	if _, err := modelsCmd(t, s, "canary", "demo", "2", "30"); err != nil {
		t.Fatal(err)
	}
	side := map[string]string{}
	canary := 0
	for i := range 100 {
		user := fmt.Sprintf("user-%d", i)
		v, err := ask(ctx, c, s, user, "")
		if err != nil {
			t.Fatal(err)
		}
		side[user] = v
		if v == "2" {
			canary++
		}
	}
	if canary < 10 || canary > 55 {
		t.Errorf("canary took %d of 100 users, want about 30", canary)
	}
	for i := range 100 {
		user := fmt.Sprintf("user-%d", i)
		if v, err := ask(ctx, c, s, user, ""); err != nil || v != side[user] {
			t.Fatalf("user %s: version %q, %v; first served by %q", user, v, err, side[user])
		}
	}
	// Rolling back the canary sends everyone to the primary again.
	if _, err := modelsCmd(t, s, "rollback", "demo"); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if v, err := ask(ctx, c, s, fmt.Sprintf("user-%d", i), ""); err != nil || v != "1" {
			t.Fatalf("after canary rollback: version %q, %v; want 1", v, err)
		}
	}
	if got := metric(t, s, "h3infer_model_version_requests_total"); got < 100 {
		t.Errorf("h3infer_model_version_requests_total = %v, want the requests counted", got)
	}
}
