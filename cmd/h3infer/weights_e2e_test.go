package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The workers of a model with external data share its packed weights by
// default: one of them builds the entry in the state dir's weights cache
// and both serve from it.
func TestServeSharesPrepackedWeights(t *testing.T) {
	model := t.TempDir()
	if out, err := exec.Command(buildBinary(t), "genmodel", "--random", "--layers", "1", "--hidden", "256", "--heads", "4",
		"--context", "128", "--external-data", "--out", model).CombinedOutput(); err != nil {
		t.Fatalf("genmodel: %v\n%s", err, out)
	}
	cfg := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, `{"models": [{"name": "demo", "dir": %q}]}`, model), 0o600); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, "--config", cfg)
	resp := postJSON(t, context.Background(), s.h3Client(t), s.base+"/v1/chat/completions", chatBody(8, false))
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), `"completion_tokens":8`) {
		t.Fatalf("chat: %s %s", resp.Status, b)
	}
	log := s.stderr.String()
	if n := strings.Count(log, "weights=prepacked"); n != 2 {
		t.Errorf("%d of 2 workers loaded the weights prepacked from the cache; log:\n%s", n, log)
	}
	if n := strings.Count(log, "prepacked weights cache: built an entry"); n != 1 {
		t.Errorf("the entry was built %d times, want 1; log:\n%s", n, log)
	}
	entries, err := filepath.Glob(filepath.Join(s.stateDir, "cache", "weights", "*", "weights.data"))
	if err != nil || len(entries) != 1 {
		t.Errorf("entries in <state_dir>/cache/weights: %v %v, want 1", entries, err)
	}
}
