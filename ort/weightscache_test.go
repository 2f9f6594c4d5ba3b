package ort

import (
	"bytes"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	onnxrt "github.com/yalue/onnxruntime_go"

	"h3infer/internal/onnxgen"
)

// logBuffer collects a logger's lines for a test; safe for the
// concurrent loads of one test.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) count(s string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Count(b.buf.String(), s)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

const builtLine = "prepacked weights cache: built an entry"

// cacheTest is a random model with external data and an empty cache
// directory for it.
type cacheTest struct {
	model, cache string
	log          *logBuffer
}

func newCacheTest(t *testing.T) *cacheTest {
	t.Helper()
	needModel(t)
	return &cacheTest{
		model: randomModelDir(t, onnxgen.Options{Layers: 2, Heads: 4, Hidden: 256, Context: 64, Seed: 5, ExternalData: true}),
		cache: filepath.Join(t.TempDir(), "cache", "weights"),
		log:   &logBuffer{},
	}
}

// load loads the model with the cache and returns where its weights went
// and the logits of a prefill.
func (c *cacheTest) load(t *testing.T) (weightMode, []float32) {
	t.Helper()
	m, err := LoadModel(c.model, Options{WeightsCache: c.cache, Log: slog.New(slog.NewTextHandler(c.log, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	logits, _, err := m.Prefill(m.Encode("the prepacked weights"))
	if err != nil {
		t.Fatal(err)
	}
	return m.weights, logits
}

// entry is the one entry in the cache; it fails the test when there is
// not exactly one.
func (c *cacheTest) entry(t *testing.T) string {
	t.Helper()
	var dirs []string
	entries, err := os.ReadDir(c.cache)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.IsDir() {
			dirs = append(dirs, filepath.Join(c.cache, e.Name()))
		}
	}
	if len(dirs) != 1 {
		t.Fatalf("cache holds %d directories (%v), want 1 entry", len(dirs), dirs)
	}
	return dirs[0]
}

// A model loaded from the cache computes what the model loaded from its
// own files does, and the entry is built once: the second load maps it.
func TestWeightsCacheHit(t *testing.T) {
	c := newCacheTest(t)
	plain, err := LoadModel(c.model, Options{})
	if err != nil {
		t.Fatal(err)
	}
	want, _, err := plain.Prefill(plain.Encode("the prepacked weights"))
	plain.Close()
	if err != nil {
		t.Fatal(err)
	}
	if plain.weights != weightsMapped {
		t.Fatalf("without a cache the weights are %s, want %s", plain.weights, weightsMapped)
	}
	for i := range 2 {
		mode, got := c.load(t)
		if mode != weightsPrepacked {
			t.Fatalf("load %d: weights %s, want %s; log:\n%s", i, mode, weightsPrepacked, c.log)
		}
		if len(got) != len(want) {
			t.Fatalf("load %d: %d logits, want %d", i, len(got), len(want))
		}
		for j := range got {
			if d := math.Abs(float64(got[j] - want[j])); d > 1e-4*(1+math.Abs(float64(want[j]))) {
				t.Fatalf("load %d: logit %d is %g, want %g as without the cache", i, j, got[j], want[j])
			}
		}
	}
	if n := c.log.count(builtLine); n != 1 {
		t.Errorf("built the entry %d times over two loads, want 1; log:\n%s", n, c.log)
	}
	entry := c.entry(t)
	info, err := os.Stat(c.cache)
	if err != nil {
		t.Fatal(err)
	}
	if p := info.Mode().Perm(); p != 0o700 {
		t.Errorf("cache directory mode %v, want 0700", p)
	}
	data, err := os.Stat(filepath.Join(entry, entryData))
	if err != nil {
		t.Fatal(err)
	}
	orig, err := os.Stat(filepath.Join(c.model, onnxgen.DataFile))
	if err != nil {
		t.Fatal(err)
	}
	// The original weights and the packed copies of the MatMul weights.
	if data.Size() <= orig.Size() {
		t.Errorf("entry data file %d bytes, want more than the model's %d: no packed weights in it", data.Size(), orig.Size())
	}
}

// Workers of one model that start together build its entry once.
func TestWeightsCacheBuildsOnce(t *testing.T) {
	c := newCacheTest(t)
	var wg sync.WaitGroup
	modes := make([]weightMode, 3)
	for i := range modes {
		wg.Go(func() {
			m, err := LoadModel(c.model, Options{WeightsCache: c.cache, Log: slog.New(slog.NewTextHandler(c.log, nil))})
			if err != nil {
				t.Error(err)
				return
			}
			modes[i] = m.weights
			m.Close()
		})
	}
	wg.Wait()
	for i, m := range modes {
		if m != weightsPrepacked {
			t.Errorf("load %d: weights %s, want %s", i, m, weightsPrepacked)
		}
	}
	if n := c.log.count(builtLine); n != 1 {
		t.Errorf("three loads at once built the entry %d times, want 1; log:\n%s", n, c.log)
	}
	c.entry(t)
}

// A damaged entry is not loaded: the model is mapped from its own files,
// with a warning, and the entry is removed so that the next load builds
// it again.
func TestWeightsCacheDamagedEntry(t *testing.T) {
	for name, damage := range map[string]func(t *testing.T, entry string){
		"truncated data": func(t *testing.T, entry string) {
			f := filepath.Join(entry, entryData)
			info, err := os.Stat(f)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(f, info.Size()/2); err != nil {
				t.Fatal(err)
			}
		},
		"garbled graph": func(t *testing.T, entry string) {
			f := filepath.Join(entry, entryModel)
			info, err := os.Stat(f)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(f, bytes.Repeat([]byte{0xff}, int(info.Size())), 0o600); err != nil {
				t.Fatal(err)
			}
		},
		"no manifest": func(t *testing.T, entry string) {
			if err := os.Remove(filepath.Join(entry, entryManifest)); err != nil {
				t.Fatal(err)
			}
		},
	} {
		t.Run(name, func(t *testing.T) {
			c := newCacheTest(t)
			_, want := c.load(t)
			damage(t, c.entry(t))
			mode, got := c.load(t)
			if mode != weightsMapped {
				t.Fatalf("weights %s from a damaged entry, want %s; log:\n%s", mode, weightsMapped, c.log)
			}
			if !strings.Contains(c.log.String(), "prepacked weights cache not used") {
				t.Errorf("no warning about the damaged entry; log:\n%s", c.log)
			}
			for j := range got {
				if d := math.Abs(float64(got[j] - want[j])); d > 1e-4*(1+math.Abs(float64(want[j]))) {
					t.Fatalf("logit %d is %g, want %g", j, got[j], want[j])
				}
			}
			if mode, _ := c.load(t); mode != weightsPrepacked {
				t.Errorf("the load after the damaged one: weights %s, want %s (rebuilt)", mode, weightsPrepacked)
			}
			if n := c.log.count(builtLine); n != 2 {
				t.Errorf("built %d times, want 2: once, and again after the damaged entry was removed", n)
			}
		})
	}
}

// A cache directory or entry that group or others may write, or an entry
// whose file is a symlink, is refused and left as it is: whoever can
// write there could plant a graph that ONNX Runtime would run.
func TestWeightsCacheRefusesWritable(t *testing.T) {
	writable := func(path func(c *cacheTest, t *testing.T) string) func(c *cacheTest, t *testing.T) string {
		return func(c *cacheTest, t *testing.T) string {
			p := path(c, t)
			info, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(p, info.Mode().Perm()|0o022); err != nil {
				t.Fatal(err)
			}
			return p
		}
	}
	for name, tc := range map[string]struct {
		plant func(c *cacheTest, t *testing.T) string // returns the path it changed
		why   string
	}{
		"cache directory": {writable(func(c *cacheTest, t *testing.T) string { return c.cache }), "lets group or others write"},
		"entry":           {writable(func(c *cacheTest, t *testing.T) string { return c.entry(t) }), "lets group or others write"},
		"entry's graph":   {writable(func(c *cacheTest, t *testing.T) string { return filepath.Join(c.entry(t), entryModel) }), "lets group or others write"},
		"symlinked data": {func(c *cacheTest, t *testing.T) string {
			f := filepath.Join(c.entry(t), entryData)
			elsewhere := filepath.Join(t.TempDir(), entryData)
			if err := os.Rename(f, elsewhere); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(elsewhere, f); err != nil {
				t.Fatal(err)
			}
			return f
		}, "not a regular file"},
	} {
		t.Run(name, func(t *testing.T) {
			c := newCacheTest(t)
			c.load(t)
			p := tc.plant(c, t)
			if mode, _ := c.load(t); mode != weightsMapped {
				t.Fatalf("weights %s after %s was planted, want %s", mode, p, weightsMapped)
			}
			if !strings.Contains(c.log.String(), tc.why) {
				t.Errorf("the warning does not say %q; log:\n%s", tc.why, c.log)
			}
			if _, err := os.Lstat(p); err != nil {
				t.Errorf("the refused %s was removed: %v", p, err)
			}
			if n := c.log.count(builtLine); n != 1 {
				t.Errorf("built %d times, want 1: a refused cache is not rebuilt", n)
			}
		})
	}
}

// Without external data there is nothing to share, and a GPU holds its
// own copy: neither touches the cache.
func TestWeightsCacheOnlyForMappedModels(t *testing.T) {
	needModel(t)
	cache := filepath.Join(t.TempDir(), "weights")
	m, err := LoadModel(demo.ModelDir(), Options{WeightsCache: cache})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.weights != weightsCopied {
		t.Errorf("a model without external data: weights %s, want %s", m.weights, weightsCopied)
	}
	if _, err := os.Stat(cache); !os.IsNotExist(err) {
		t.Errorf("the cache directory was made for a model without external data: %v", err)
	}
}

// What ONNX Runtime loads is the entry the checks passed, even when the
// directories above it change in between: whoever can write a parent of
// the cache directory must not get a refused entry of theirs loaded by
// swapping it in after the checks.
func TestWeightsCacheLoadsTheCheckedEntry(t *testing.T) {
	needModel(t)
	o := onnxgen.Options{Layers: 1, Heads: 2, Hidden: 64, Context: 64, Seed: 5, ExternalData: true}
	a := randomModelDir(t, o)
	o.Seed = 6
	b := randomModelDir(t, o)
	base := t.TempDir()
	good, planted := filepath.Join(base, "good", "weights"), filepath.Join(base, "planted", "weights")
	m, err := LoadModel(a, Options{WeightsCache: good})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	want, _, err := m.Prefill(m.Encode("the prepacked weights"))
	if err != nil {
		t.Fatal(err)
	}
	// The planted entry: b's graph and weights under a's key, in a
	// directory others may write, which the checks refuse.
	pm, err := LoadModel(b, Options{WeightsCache: planted})
	if err != nil {
		t.Fatal(err)
	}
	pm.Close()
	keyA, _, _, err := cacheKey(a)
	if err != nil {
		t.Fatal(err)
	}
	keyB, _, _, err := cacheKey(b)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(planted, keyB), filepath.Join(planted, keyA)); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(planted, keyA), 0o777); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink("good", link); err != nil {
		t.Fatal(err)
	}
	// The session's options are made after the entry is checked and
	// before ONNX Runtime opens it: the swap goes there.
	swapped := false
	newOptions := func() (*onnxrt.SessionOptions, error) {
		if !swapped {
			swapped = true
			tmp := filepath.Join(base, "link.tmp")
			if err := os.Symlink("planted", tmp); err != nil {
				return nil, err
			}
			if err := os.Rename(tmp, link); err != nil {
				return nil, err
			}
		}
		return newSessionOptions(Options{}, m.place)
	}
	c := weightsCache{dir: filepath.Join(link, "weights"), log: slog.New(slog.DiscardHandler)}
	s, built, err := c.session(a, newOptions, m.inNames, m.outNames)
	if err != nil {
		t.Fatalf("session (built %v): %v", built, err)
	}
	if !swapped || built {
		t.Fatalf("swapped %v, built %v: the swap did not fall between the checks and the load", swapped, built)
	}
	m.session.Destroy()
	m.session = s
	got, _, err := m.Prefill(m.Encode("the prepacked weights"))
	if err != nil {
		t.Fatal(err)
	}
	for j := range got {
		if d := math.Abs(float64(got[j] - want[j])); d > 1e-4*(1+math.Abs(float64(want[j]))) {
			t.Fatalf("logit %d is %g, want %g: the planted entry was loaded, not the one checked", j, got[j], want[j])
		}
	}
}

// Two models with one graph and data files of one size and modification
// time (a fine-tune of a base, both copied with their times kept) each
// get their own weights from the cache.
func TestWeightsCacheTellsVersionsApart(t *testing.T) {
	needModel(t)
	o := onnxgen.Options{Layers: 1, Heads: 2, Hidden: 128, Context: 64, Seed: 5, ExternalData: true}
	base := randomModelDir(t, o)
	o.Seed = 6
	other := randomModelDir(t, o)
	otherData, err := os.ReadFile(filepath.Join(other, onnxgen.DataFile))
	if err != nil {
		t.Fatal(err)
	}
	baseData := filepath.Join(base, onnxgen.DataFile)
	info, err := os.Stat(baseData)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(otherData)) != info.Size() {
		t.Fatalf("data files of %d and %d bytes, want one size", len(otherData), info.Size())
	}
	// tune: base's graph with the other weights, the base's times.
	tune := t.TempDir()
	entries, err := os.ReadDir(base)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(base, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if e.Name() == onnxgen.DataFile {
			b = otherData
		}
		f := filepath.Join(tune, e.Name())
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(f, info.ModTime(), info.ModTime()); err != nil {
			t.Fatal(err)
		}
	}
	logits := func(dir string, opts Options) []float32 {
		t.Helper()
		m, err := LoadModel(dir, opts)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		l, _, err := m.Prefill(m.Encode("the prepacked weights"))
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	same := func(got, want []float32) bool {
		for j := range got {
			if d := math.Abs(float64(got[j] - want[j])); d > 1e-4*(1+math.Abs(float64(want[j]))) {
				return false
			}
		}
		return true
	}
	wantTune := logits(tune, Options{})
	cache := filepath.Join(t.TempDir(), "weights")
	logits(base, Options{WeightsCache: cache})
	if !same(logits(tune, Options{WeightsCache: cache}), wantTune) {
		t.Errorf("the fine-tune through the cache computes other logits than without it: it got the base's weights")
	}
}

// An entry that no model will load again is removed by the next build:
// the model's data file rewritten in its directory leaves its old entry
// behind, and a model directory removed leaves its own; an entry a
// worker is building (its lock held) stays.
func TestWeightsCachePrunesEntriesNoModelLoads(t *testing.T) {
	c := newCacheTest(t)
	c.load(t)
	first := c.entry(t)

	// The same directory, its data rewritten: a new entry, the old one
	// gone.
	data := filepath.Join(c.model, "model.onnx.data")
	later := time.Now().Add(time.Minute)
	if err := os.Chtimes(data, later, later); err != nil {
		t.Fatal(err)
	}
	c.load(t)
	second := c.entry(t)
	if second == first {
		t.Fatal("the changed model loaded its old entry")
	}
	if !strings.Contains(c.log.String(), "removed an entry no model will load") {
		t.Errorf("no removal logged:\n%s", c.log)
	}

	// Another model, in a directory that is then removed, and a third
	// whose build is in progress elsewhere (its lock held): building a
	// fourth removes the removed model's entry only.
	gone := &cacheTest{model: randomModelDir(t, onnxgen.Options{Layers: 1, Heads: 4, Hidden: 256, Context: 64, Seed: 6, ExternalData: true}), cache: c.cache, log: c.log}
	gone.load(t)
	busy := &cacheTest{model: randomModelDir(t, onnxgen.Options{Layers: 1, Heads: 4, Hidden: 256, Context: 64, Seed: 7, ExternalData: true}), cache: c.cache, log: c.log}
	busy.load(t)
	entries := func() map[string]bool {
		got := map[string]bool{}
		list, err := os.ReadDir(c.cache)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range list {
			if e.IsDir() {
				got[e.Name()] = true
			}
		}
		return got
	}
	before := entries()
	if len(before) != 3 {
		t.Fatalf("cache holds %v, want three entries", before)
	}
	_, _, goneAbs, err := cacheKey(gone.model)
	if err != nil {
		t.Fatal(err)
	}
	busyKey, _, _, err := cacheKey(busy.model)
	if err != nil {
		t.Fatal(err)
	}
	goneKey, _, _, err := cacheKey(gone.model)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(goneAbs); err != nil {
		t.Fatal(err)
	}
	// The busy model's directory is gone too, but its lock is held.
	_, _, busyAbs, err := cacheKey(busy.model)
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := lockFile(filepath.Join(c.cache, busyKey) + ".lock")
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	if err := os.RemoveAll(busyAbs); err != nil {
		t.Fatal(err)
	}
	fourth := &cacheTest{model: randomModelDir(t, onnxgen.Options{Layers: 1, Heads: 4, Hidden: 256, Context: 64, Seed: 8, ExternalData: true}), cache: c.cache, log: c.log}
	if mode, _ := fourth.load(t); mode != weightsPrepacked {
		t.Fatalf("weights %s, want %s; log:\n%s", mode, weightsPrepacked, c.log)
	}
	after := entries()
	if after[goneKey] {
		t.Error("the entry of a removed model directory stayed")
	}
	if !after[busyKey] {
		t.Error("an entry whose lock was held was removed")
	}
	if !after[filepath.Base(second)] {
		t.Error("the entry of a model still in place was removed")
	}
}
