package ort

import (
	"bufio"
	"os"
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
	for _, tc := range []struct {
		name        string
		copyWeights bool
		minAnon     int64 // growth of anonymous memory, as a fraction of the weights, in 1/100
		maxAnon     int64
	}{
		// No lower bound when mapped: memory an earlier test's model
		// freed may go back to the system meanwhile, and shrink it.
		{name: "mapped", copyWeights: false, minAnon: -1000, maxAnon: 25},
		{name: "copied", copyWeights: true, minAnon: 75, maxAnon: 1000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var before, after runtime.MemStats
			debug.FreeOSMemory()
			runtime.ReadMemStats(&before)
			anon0 := anonymousBytes(t)
			m, err := LoadModel(dir, Options{CopyWeights: tc.copyWeights})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
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
