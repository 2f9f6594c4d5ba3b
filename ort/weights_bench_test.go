package ort

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

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
// sequence's decode step over 64 cached tokens, reported as tokens/s.
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
	for _, mode := range modes {
		b.Run("decode/weights="+mode.name, func(b *testing.B) {
			m, err := LoadModel(dir, Options{CopyWeights: mode.copy})
			if err != nil {
				b.Fatal(err)
			}
			defer m.Close()
			const past = 64
			prompt := m.Encode(strings.Repeat("The gateway ", past/12+1))[:past]
			_, kv, err := m.Prefill(prompt)
			if err != nil {
				b.Fatal(err)
			}
			ns := stepLoop(b, m, 1, past, kv)
			b.ReportMetric(1e9/ns, "tokens/s")
		})
	}
}
