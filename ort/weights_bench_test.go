package ort

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"h3infer/internal/onnxgen"
)

// weightsModelEnv names a model directory with external data for
// BenchmarkWeights; scripts/bench-weights.sh passes its 400 MB model.
const weightsModelEnv = "H3INFER_BENCH_WEIGHTS_MODEL"

// BenchmarkWeights compares the two places a CPU session's weights can
// live: mapped from model.onnx.data (the default) and copied by ONNX
// Runtime's prepacking (Options.CopyWeights). "read" is reading the same
// files into memory, what any load must at least cost once the page
// cache holds them; "load" is what a worker takes to be ready to answer:
// LoadModel, a one-token prefill (which touches every weight) and Close;
// "decode" is one
// sequence's decode step over 64 cached tokens, reported as tokens/s of
// each and the ratio of mapped to copied.
// Without the environment variable the model is a 100 MB random one.
func BenchmarkWeights(b *testing.B) {
	needModel(b)
	dir := os.Getenv(weightsModelEnv)
	if dir == "" {
		dir = b.TempDir()
		if err := onnxgen.Write(dir, onnxgen.Options{Random: true, Layers: 2, Heads: 8, Hidden: 1024, Context: 256, Seed: 1, ExternalData: true}); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("read", func(b *testing.B) {
		var n int64
		for b.Loop() {
			n = 0
			for _, f := range []string{modelFile, onnxgen.DataFile} {
				data, err := os.ReadFile(filepath.Join(dir, f))
				if err != nil {
					b.Fatal(err)
				}
				n += int64(len(data))
			}
		}
		b.SetBytes(n)
	})
	modes := []struct {
		name string
		copy bool
	}{{"mapped", false}, {"copied", true}}
	for _, mode := range modes {
		b.Run("load/weights="+mode.name, func(b *testing.B) {
			for b.Loop() {
				m, err := LoadModel(dir, Options{CopyWeights: mode.copy})
				if err != nil {
					b.Fatal(err)
				}
				if _, _, err := m.Prefill(m.Encode("a")); err != nil {
					b.Fatal(err)
				}
				m.Close()
			}
		})
	}
	// Decode steps of the two alternate, one each per iteration, so that
	// whatever else the machine runs slows both alike and the ratio holds.
	b.Run("decode", func(b *testing.B) {
		const past = 64
		type run struct {
			m       *Model
			bt      *batch
			kv      [][]byte
			elapsed time.Duration
		}
		runs := make([]*run, len(modes))
		for i, mode := range modes {
			m, err := LoadModel(dir, Options{CopyWeights: mode.copy})
			if err != nil {
				b.Fatal(err)
			}
			defer m.Close()
			prompt := m.Encode(strings.Repeat("The gateway ", past/12+1))[:past]
			_, kv, err := m.Prefill(prompt)
			if err != nil {
				b.Fatal(err)
			}
			bt := m.newBatch()
			defer bt.close()
			bt.join(kv, past)
			runs[i] = &run{m: m, bt: bt, kv: kv}
		}
		next := []int{'e'}
		for b.Loop() {
			for _, r := range runs {
				if r.bt.widest() >= r.m.cfg.ContextLength-1 {
					r.bt.leave(0)
					r.bt.join(r.kv, past)
				}
				start := time.Now()
				if _, err := r.bt.step(next); err != nil {
					b.Fatal(err)
				}
				r.elapsed += time.Since(start)
			}
		}
		for i, mode := range modes {
			b.ReportMetric(float64(b.N)/runs[i].elapsed.Seconds(), mode.name+"-tokens/s")
		}
		b.ReportMetric(runs[1].elapsed.Seconds()/runs[0].elapsed.Seconds(), "mapped/copied")
	})
}
