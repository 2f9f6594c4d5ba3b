package ort

import (
	"fmt"
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

// BenchmarkWeights compares the three places a CPU session's weights can
// live: mapped from model.onnx.data without prepacking (no cache),
// copied by ONNX Runtime's prepacking into the process's own memory
// (Options.CopyWeights), and prepacked and mapped from the prepacked
// weights cache (Options.WeightsCache, the default of a worker). "read"
// is reading the model's files into memory, what any load must at least
// cost once the page cache holds them; "load" is what a worker takes to
// be ready to answer: LoadModel, a one-token prefill (which touches every
// weight) and Close, from a cache that holds the model's entry for
// "prepacked"; "build" is the same for a worker that finds the cache
// empty and builds the entry first. "prefill" is a 64-token prompt and
// "decode/batch=N" a decode step of N sequences over 64 cached tokens,
// each reported as tokens/s of the three and the ratios of mapped and
// prepacked to copied.
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
	cache := b.TempDir()
	modes := []struct {
		name string
		opts Options
		want weightMode
	}{
		{"mapped", Options{}, weightsMapped},
		{"copied", Options{CopyWeights: true}, weightsCopied},
		{"prepacked", Options{WeightsCache: cache}, weightsPrepacked},
	}
	// load is one worker's load, ready to answer.
	load := func(b *testing.B, opts Options, want weightMode) {
		m, err := LoadModel(dir, opts)
		if err != nil {
			b.Fatal(err)
		}
		defer m.Close()
		if m.weights != want {
			b.Fatalf("weights %s, want %s", m.weights, want)
		}
		if _, _, err := m.Prefill(m.Encode("a")); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("build", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			empty := b.TempDir()
			b.StartTimer()
			load(b, Options{WeightsCache: empty}, weightsPrepacked)
			b.StopTimer()
			os.RemoveAll(empty) // entries of a 400 MB model take 800 MB each
			b.StartTimer()
		}
	})
	for _, mode := range modes {
		b.Run("load/weights="+mode.name, func(b *testing.B) {
			// Untimed: the page cache then holds the files, and the
			// cache the entry.
			load(b, mode.opts, mode.want)
			for b.Loop() {
				load(b, mode.opts, mode.want)
			}
		})
	}
	// The steps of the three alternate, one each per iteration, so that
	// whatever else the machine runs slows all alike and the ratios hold.
	// The sessions the steps run on, loaded by the first benchmark that
	// needs them, so that the loads above run without them.
	var models []*Model
	defer func() {
		for _, m := range models {
			m.Close()
		}
	}()
	open := func(b *testing.B) []*Model {
		for _, mode := range modes[len(models):] {
			m, err := LoadModel(dir, mode.opts)
			if err != nil {
				b.Fatal(err)
			}
			models = append(models, m)
			if m.weights != mode.want {
				b.Fatalf("weights %s, want %s", m.weights, mode.want)
			}
		}
		return models
	}
	const past = 64
	prompt := func(m *Model) []int { return m.Encode(strings.Repeat("The gateway ", past/12+1))[:past] }
	alternate := func(b *testing.B, unit string, perStep float64, steps []func() error) {
		elapsed := make([]time.Duration, len(steps))
		for b.Loop() {
			for i, step := range steps {
				start := time.Now()
				if err := step(); err != nil {
					b.Fatal(err)
				}
				elapsed[i] += time.Since(start)
			}
		}
		for i, mode := range modes {
			b.ReportMetric(perStep*float64(b.N)/elapsed[i].Seconds(), mode.name+"-"+unit)
		}
		b.ReportMetric(elapsed[1].Seconds()/elapsed[0].Seconds(), "mapped/copied")
		b.ReportMetric(elapsed[1].Seconds()/elapsed[2].Seconds(), "prepacked/copied")
	}
	// prefill is one prompt of 64 tokens, which multiplies 64 rows by
	// each weight.
	b.Run("prefill", func(b *testing.B) {
		steps := make([]func() error, len(modes))
		for i, m := range open(b) {
			steps[i] = func() error {
				_, _, err := m.Prefill(prompt(m))
				return err
			}
		}
		alternate(b, "tokens/s", past, steps)
	})
	// decode is a decode step of rows sequences of 64 cached tokens and
	// more; a step multiplies one row per sequence by each weight.
	for _, rows := range []int{1, 8} {
		b.Run(fmt.Sprintf("decode/batch=%d", rows), func(b *testing.B) {
			steps := make([]func() error, len(modes))
			for i, m := range open(b) {
				_, kv, err := m.Prefill(prompt(m))
				if err != nil {
					b.Fatal(err)
				}
				bt := m.newBatch()
				defer bt.close()
				next := make([]int, rows)
				for r := range rows {
					bt.join(kv, past)
					next[r] = 'e'
				}
				steps[i] = func() error {
					if bt.widest() >= m.cfg.ContextLength-1 {
						for range rows {
							bt.leave(0)
						}
						for range rows {
							bt.join(kv, past)
						}
					}
					_, err := bt.step(next)
					return err
				}
			}
			alternate(b, "tokens/s", float64(rows), steps)
		})
	}
}
