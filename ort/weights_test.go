package ort

import (
	"bufio"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"

	"h3infer/internal/onnxgen"
)

// A model's external weights stay in the file's pages, which every worker
// that maps them shares, and never pass through the Go heap; copying them
// (ONNX Runtime's default) shows as anonymous memory of the process's own
// the size of the weights, which is what this test would see if an option
// stopped working.
func TestWeightsStayMapped(t *testing.T) {
	needModel(t)
	dir := randomModelDir(t, onnxgen.Options{Layers: 2, Heads: 4, Hidden: 768, Context: 64, Seed: 3, ExternalData: true})
	info, err := os.Stat(dir + "/" + onnxgen.DataFile)
	if err != nil {
		t.Fatal(err)
	}
	weights := info.Size() // about 57 MB
	cache := filepath.Join(t.TempDir(), "weights")
	for _, tc := range []struct {
		name    string
		opts    Options
		build   bool // load once before measuring, which builds the cache's entry
		want    weightMode
		minAnon int64 // growth of anonymous memory, as a fraction of the weights, in 1/100
		maxAnon int64
	}{
		// No lower bound when mapped: memory an earlier test's model
		// freed may go back to the system meanwhile, and shrink it.
		{name: "mapped", want: weightsMapped, minAnon: -1000, maxAnon: 25},
		{name: "copied", opts: Options{CopyWeights: true}, want: weightsCopied, minAnon: 75, maxAnon: 1000},
		// The packed weights are mapped from the cache's entry.
		{name: "prepacked", opts: Options{WeightsCache: cache}, build: true, want: weightsPrepacked, minAnon: -1000, maxAnon: 25},
		// The load that builds the entry holds the packed weights in
		// memory of its own while ONNX Runtime writes them, and gives
		// that back before it loads the entry.
		{name: "prepacked/building", opts: Options{WeightsCache: filepath.Join(t.TempDir(), "weights")}, want: weightsPrepacked, minAnon: -1000, maxAnon: 25},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.build {
				m, err := LoadModel(dir, tc.opts)
				if err != nil {
					t.Fatal(err)
				}
				m.Close()
			}
			var before, after runtime.MemStats
			debug.FreeOSMemory()
			runtime.ReadMemStats(&before)
			anon0 := anonymousBytes(t)
			m, err := LoadModel(dir, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			if m.weights != tc.want {
				t.Fatalf("weights %s, want %s", m.weights, tc.want)
			}
			// A prefill touches every weight.
			if _, _, err := m.Prefill(m.Encode("weights")); err != nil {
				t.Fatal(err)
			}
			anon := anonymousBytes(t) - anon0
			runtime.ReadMemStats(&after)
			if got := int64(after.TotalAlloc - before.TotalAlloc); got > weights/10 {
				t.Errorf("the Go heap took %d bytes during the load, want well under the %d bytes of weights", got, weights)
			}
			if pct := anon * 100 / weights; pct < tc.minAnon || pct > tc.maxAnon {
				t.Errorf("anonymous memory grew by %d bytes, %d%% of the %d bytes of weights; want %d%%..%d%%", anon, pct, weights, tc.minAnon, tc.maxAnon)
			}
		})
	}
}

// anonymousBytes is the process's anonymous memory (Anonymous in
// /proc/self/smaps_rollup): what it holds that no file backs.
func anonymousBytes(t *testing.T) int64 {
	t.Helper()
	f, err := os.Open("/proc/self/smaps_rollup")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "Anonymous:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no Anonymous line in /proc/self/smaps_rollup")
	return 0
}
