package workerpool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/workerconf"
)

// fakeLoader records what the registry asks the workers to load; it fails
// the versions listed in broken. The registry, not the workers, is under
// test here: TestModelVersions in cmd/h3infer runs the real thing.
type fakeLoader struct {
	mu     sync.Mutex
	loaded map[string]bool
	broken map[string]bool
}

func (f *fakeLoader) LoadModel(_ context.Context, s workerconf.Model) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.broken[s.Name] {
		return errors.New("worker 0: protobuf parsing failed")
	}
	f.loaded[s.Name] = true
	return nil
}

func (f *fakeLoader) UnloadModel(_ context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.loaded, name)
	return nil
}

func (f *fakeLoader) Models() []infer.ModelInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []infer.ModelInfo
	for n := range f.loaded {
		out = append(out, infer.ModelInfo{Name: n, ContextLength: 64})
	}
	return out
}

func (f *fakeLoader) Ready() bool { return true }

func testRegistry(t *testing.T, versions ...string) (*Registry, *fakeLoader) {
	t.Helper()
	root := t.TempDir()
	for _, v := range versions {
		dir := filepath.Join(root, "m", v)
		os.MkdirAll(dir, 0o755)
		os.WriteFile(filepath.Join(dir, workerconf.ModelConfigFile), []byte(`{"name":"m","context_length":64,"eos_token":"<eos>"}`), 0o644)
		os.WriteFile(filepath.Join(dir, workerconf.TokenizerFile), []byte(`{}`), 0o644)
		os.WriteFile(filepath.Join(dir, workerconf.ModelFile), []byte(`x`), 0o644)
	}
	fl := &fakeLoader{loaded: map[string]bool{}, broken: map[string]bool{}}
	r, err := NewRegistry(RegistryConfig{Root: root}, fl, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	specs, err := r.Initial()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range specs {
		fl.loaded[s.Name] = true
	}
	return r, fl
}

func route(t *testing.T, r *Registry, key, pin string) string {
	t.Helper()
	_, ver, done, err := r.Route("m", key, pin)
	if err != nil {
		t.Fatal(err)
	}
	done(false)
	return ver
}

// TestCanarySplit routes 2,000 requests from distinct users through a 95/5
// canary: the canary's share is within 3 points of 5%, and every user gets
// the same version again.
func TestCanarySplit(t *testing.T) {
	r, _ := testRegistry(t, "1", "2")
	ctx := t.Context()
	if err := r.Promote(ctx, "m", "1"); err != nil {
		t.Fatal(err)
	}
	if err := r.Canary(ctx, "m", "2", 5); err != nil {
		t.Fatal(err)
	}
	const n = 2000
	first := map[string]string{}
	canary := 0
	for i := range n {
		key := fmt.Sprintf("tenant-%d", i)
		v := route(t, r, key, "")
		first[key] = v
		if v == "2" {
			canary++
		}
	}
	if pct := 100 * float64(canary) / n; pct < 2 || pct > 8 {
		t.Errorf("canary share %.1f%%, want 5 ± 3", pct)
	}
	for key, v := range first {
		if got := route(t, r, key, ""); got != v {
			t.Fatalf("key %s moved from version %s to %s", key, v, got)
		}
	}
	// Raising the share keeps the canary's users on it: the buckets are fixed.
	if err := r.Canary(ctx, "m", "2", 50); err != nil {
		t.Fatal(err)
	}
	for key, v := range first {
		if v == "2" && route(t, r, key, "") != "2" {
			t.Fatalf("key %s left the canary when its share grew", key)
		}
	}
}

func TestRegistryRefusesAndRollsBack(t *testing.T) {
	r, fl := testRegistry(t, "1", "2", "3")
	ctx := t.Context()
	if got := route(t, r, "", ""); got != "3" {
		t.Fatalf("initial primary %s, want the highest version 3", got)
	}
	fl.broken["m@2"] = true
	err := r.Promote(ctx, "m", "2")
	var ve *VersionError
	if !errors.As(err, &ve) || ve.NotFound() {
		t.Fatalf("promote of a broken version: %v, want a refusal", err)
	}
	if got := route(t, r, "", ""); got != "3" {
		t.Errorf("after the refusal: version %s, want 3 still", got)
	}
	if err := r.Promote(ctx, "m", "1"); err != nil {
		t.Fatal(err)
	}
	// A request that started on 1 holds it across a rollback and keeps it
	// loaded until it ends.
	_, ver, done, err := r.Route("m", "", "")
	if err != nil || ver != "1" {
		t.Fatalf("route: %s, %v", ver, err)
	}
	if err := r.Rollback(ctx, "m"); err != nil {
		t.Fatal(err)
	}
	if got := route(t, r, "", ""); got != "3" {
		t.Errorf("after rollback: version %s, want 3", got)
	}
	if got := route(t, r, "", "1"); got != "1" {
		t.Errorf("pinned: version %s, want 1", got)
	}
	if err := r.UnloadVersion(ctx, "m", "3"); err == nil {
		t.Error("unloading the primary succeeded")
	}
	unloaded := make(chan error, 1)
	go func() { unloaded <- r.UnloadVersion(ctx, "m", "1") }()
	if _, _, _, err := waitRouteGone(r, "1"); err == nil {
		t.Error("a retiring version still takes pinned requests")
	}
	select {
	case err := <-unloaded:
		t.Fatalf("version 1 unloaded while a request held it: %v", err)
	default:
	}
	fl.mu.Lock()
	stillLoaded := fl.loaded["m@1"]
	fl.mu.Unlock()
	if !stillLoaded {
		t.Fatal("version 1 left the workers while a request held it")
	}
	done(false)
	if err := <-unloaded; err != nil {
		t.Fatal(err)
	}
	if fl.loaded["m@1"] {
		t.Error("version 1 still loaded after its last request ended")
	}
}

// waitRouteGone routes a request pinned to ver once the registry has
// started retiring it.
func waitRouteGone(r *Registry, ver string) (string, string, func(bool), error) {
	for {
		r.mu.Lock()
		v := r.models["m"].versions[ver]
		retired := v == nil || v.retired
		r.mu.Unlock()
		if retired {
			return r.Route("m", "", ver)
		}
	}
}

// TestSetPolicy changes a running Watch's poll interval and auto-promotion:
// a new version waits while auto-promotion is off and becomes the primary
// once it is turned on; an invalid policy is refused.
func TestSetPolicy(t *testing.T) {
	r, _ := testRegistry(t, "1")
	if err := r.SetPolicy(Policy{Poll: -time.Second}); err == nil || !strings.Contains(err.Error(), "model_repository.poll") {
		t.Fatalf("invalid policy: err %v, want one naming model_repository.poll", err)
	}
	// Watch starts on an hour's interval: seeing version 2 below shows
	// that the new interval reached a Watch already waiting on the old.
	if err := r.SetPolicy(Policy{Poll: time.Hour}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	wg.Go(func() { r.Watch(ctx) })
	t.Cleanup(func() { cancel(); wg.Wait() })
	if err := r.SetPolicy(Policy{Poll: 10 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(r.cfg.Root, "m", "2")
	os.MkdirAll(dir, 0o755)
	os.WriteFile(filepath.Join(dir, workerconf.ModelConfigFile), []byte(`{"name":"m","context_length":64,"eos_token":"<eos>"}`), 0o644)
	os.WriteFile(filepath.Join(dir, workerconf.TokenizerFile), []byte(`{}`), 0o644)
	os.WriteFile(filepath.Join(dir, workerconf.ModelFile), []byte(`x`), 0o644)
	// Polls see version 2; without auto-promotion it waits for the admin
	// API.
	deadline := time.Now().Add(30 * time.Second)
	for {
		r.mu.Lock()
		seen := r.models["m"].seen["2"] != ""
		r.mu.Unlock()
		if seen {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the new poll interval never reached Watch: version 2 not seen")
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // more polls, which must not promote
	if got := route(t, r, "", ""); got != "1" {
		t.Fatalf("auto_promote off: primary %s, want 1", got)
	}
	if err := r.SetPolicy(Policy{Poll: 10 * time.Millisecond, AutoPromote: true}); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(30 * time.Second)
	for route(t, r, "", "") != "2" {
		if time.Now().After(deadline) {
			t.Fatal("auto_promote turned on: version 2 never became the primary")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestResolveFollowsRouting checks that Resolve names the version Route
// would pick, with its directory, across a canary and a promotion, and
// that it routes no request: the version's in-flight count stays 0.
func TestResolveFollowsRouting(t *testing.T) {
	r, _ := testRegistry(t, "1", "2")
	ctx := t.Context()
	if err := r.Promote(ctx, "m", "1"); err != nil {
		t.Fatal(err)
	}
	if err := r.Canary(ctx, "m", "2", 50); err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		key := fmt.Sprintf("tenant-%d", i)
		ver, dir, err := r.Resolve("m", key, "")
		if err != nil {
			t.Fatal(err)
		}
		if want := route(t, r, key, ""); ver != want {
			t.Fatalf("key %s: Resolve says version %s, Route %s", key, ver, want)
		}
		if filepath.Base(dir) != ver || filepath.Base(filepath.Dir(dir)) != "m" {
			t.Errorf("version %s: dir %s, want .../m/%s", ver, dir, ver)
		}
	}
	if ver, _, err := r.Resolve("m", "anyone", "2"); err != nil || ver != "2" {
		t.Errorf("pinned to 2: %s, %v", ver, err)
	}
	if err := r.Promote(ctx, "m", "2"); err != nil {
		t.Fatal(err)
	}
	if ver, _, err := r.Resolve("m", "anyone", ""); err != nil || ver != "2" {
		t.Errorf("after promoting 2: %s, %v", ver, err)
	}
	for _, c := range []struct{ model, pin string }{{"nope", ""}, {"m", "9"}} {
		_, _, err := r.Resolve(c.model, "", c.pin)
		var ve *VersionError
		if !errors.As(err, &ve) || !ve.NotFound() {
			t.Errorf("Resolve(%q, pin %q): %v, want a not-found VersionError", c.model, c.pin, err)
		}
	}
	for _, s := range r.ModelStatus().([]ModelStatus) {
		for _, v := range s.Loaded {
			if v.Inflight != 0 {
				t.Errorf("version %s has %d requests in flight after Resolve alone", v.Version, v.Inflight)
			}
		}
	}
}
