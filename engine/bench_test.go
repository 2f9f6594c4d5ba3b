package engine

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/internal/onnxgen"
	"h3infer/transport"
	"h3infer/workerconf"
)

// BenchmarkWorkerConcurrency loads one worker, over a real ring, with 1, 8,
// 32 and 64 clients that each send requests back to back, for the
// synthetic model (the loop's own cost, no model's), the demo model and a
// random model of hidden size 512 and 4 layers. Each sub-benchmark runs a
// fixed window and reports aggregate tokens/s, time to first token and
// inter-token latency (p50, p99), and its tokens/s as a multiple of
// concurrency 1 measured in the same run (x_c1). The random model runs in
// both cache layouts (ort/batch.go): concat, the usual export, and append,
// where the worker keeps the cache.
//
//	go test -run '^$' -bench WorkerConcurrency -benchtime 1x ./engine/
func BenchmarkWorkerConcurrency(b *testing.B) {
	needModel(b)
	window := benchWindow(b)
	models := []struct{ name, dir string }{{"synthetic", workerconf.SyntheticDir}, {"demo", demo.ModelDir()}}
	for _, layout := range []string{onnxgen.KVCacheConcat, onnxgen.KVCacheAppend} {
		dir := filepath.Join(b.TempDir(), "h512l4-"+layout)
		if err := onnxgen.Write(dir, onnxgen.Options{Random: true, Layers: 4, Heads: 8, Hidden: 512, Seed: 1, KVCache: layout}); err != nil {
			b.Fatal(err)
		}
		models = append(models, struct{ name, dir string }{"h512l4/kv_cache=" + layout, dir})
	}
	for _, model := range models {
		b.Run("model="+model.name, func(b *testing.B) {
			rw := startRingWorkerWith(b, 64, model.dir, 0)
			var base float64
			var ids atomic.Uint64
			for _, c := range []int{1, 8, 32, 64} {
				b.Run(fmt.Sprintf("c=%d", c), func(b *testing.B) {
					var r loadResult
					for b.Loop() {
						r = runLoad(b, rw.end, &ids, c, window)
					}
					tps := float64(r.tokens) / r.elapsed.Seconds()
					if c == 1 {
						base = tps
					}
					b.ReportMetric(tps, "tok/s")
					b.ReportMetric(ms(percentile(r.ttft, 50)), "ttft_p50_ms")
					b.ReportMetric(ms(percentile(r.ttft, 99)), "ttft_p99_ms")
					b.ReportMetric(ms(percentile(r.itl, 50)), "itl_p50_ms")
					b.ReportMetric(ms(percentile(r.itl, 99)), "itl_p99_ms")
					if base > 0 {
						b.ReportMetric(tps/base, "x_c1")
					}
				})
			}
		})
	}
}

// BenchmarkProviders measures a generated model of hidden size 1024 (4
// layers, 16 heads) at concurrency 1 and 32 on each execution provider
// named in H3INFER_BENCH_PROVIDERS (default "cpu"; "cpu,cuda" on a GPU
// host, with ONNXRUNTIME_LIB pointing at the set make ort-cuda fetches),
// each with the KV cache in host memory (kv=host, the runtime's inputs and
// outputs in Go memory) and kept in the provider's memory through IO
// binding (kv=device). Every column reports tokens/s, time to first token
// and inter-token latency, and its tokens/s as a multiple of cpu kv=host at
// the same concurrency, measured in the same run (x_cpu_host).
//
//	go test -run '^$' -bench Providers -benchtime 1x ./engine/
func BenchmarkProviders(b *testing.B) {
	needModel(b)
	window := benchWindow(b)
	providers := []string{"cpu"}
	if v := os.Getenv("H3INFER_BENCH_PROVIDERS"); v != "" {
		providers = strings.Split(v, ",")
	}
	dir := filepath.Join(b.TempDir(), "h1024l4")
	if err := onnxgen.Write(dir, onnxgen.Options{Random: true, Layers: 4, Heads: 16, Hidden: 1024, Seed: 1}); err != nil {
		b.Fatal(err)
	}
	base := map[int]float64{} // concurrency -> cpu kv=host tokens/s
	var ids atomic.Uint64
	for _, name := range providers {
		p, err := workerconf.ParseProvider(name)
		if err != nil {
			b.Fatalf("H3INFER_BENCH_PROVIDERS: %v", err)
		}
		for _, onDevice := range []bool{false, true} {
			kv := map[bool]string{false: "host", true: "device"}[onDevice]
			b.Run(fmt.Sprintf("provider=%s/kv=%s", p, kv), func(b *testing.B) {
				rw := startRingWorkerSpec(b, 32, workerconf.Model{Name: "demo", Dir: dir, Provider: p, DeviceKV: &onDevice}, 0)
				for _, c := range []int{1, 32} {
					b.Run(fmt.Sprintf("c=%d", c), func(b *testing.B) {
						var r loadResult
						for b.Loop() {
							r = runLoad(b, rw.end, &ids, c, window)
						}
						tps := float64(r.tokens) / r.elapsed.Seconds()
						if p == workerconf.ProviderCPU && !onDevice {
							base[c] = tps
						}
						b.ReportMetric(tps, "tok/s")
						b.ReportMetric(ms(percentile(r.ttft, 50)), "ttft_p50_ms")
						b.ReportMetric(ms(percentile(r.ttft, 99)), "ttft_p99_ms")
						b.ReportMetric(ms(percentile(r.itl, 50)), "itl_p50_ms")
						if base[c] > 0 {
							b.ReportMetric(tps/base[c], "x_cpu_host")
						}
					})
				}
			})
		}
	}
}

// benchWindow is how long each load level runs: 4 s, or
// H3INFER_BENCH_WINDOW.
func benchWindow(b *testing.B) time.Duration {
	v := os.Getenv("H3INFER_BENCH_WINDOW")
	if v == "" {
		return 4 * time.Second
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		b.Fatalf("H3INFER_BENCH_WINDOW: %v", err)
	}
	return d
}

type loadResult struct {
	tokens    int
	elapsed   time.Duration
	ttft, itl []time.Duration
}

// runLoad runs c clients for window; each sends a 64-token request
// (ignore_eos) with a prompt of its own length as soon as its previous one
// ends.
func runLoad(b *testing.B, end *transport.GatewayEnd, ids *atomic.Uint64, c int, window time.Duration) loadResult {
	var (
		mu  sync.Mutex
		res loadResult
		wg  sync.WaitGroup
	)
	start := time.Now()
	stop := start.Add(window)
	for client := range c {
		wg.Go(func() {
			prompt := "The gateway hands each request to a worker. "[:10+client%30]
			for time.Now().Before(stop) {
				// IgnoreEOS: every request is the 64 tokens it asks for, as
				// the random model draws its end token early and often.
				s := &infer.Request{Model: "demo", Prompt: prompt, MaxTokens: 64, Temperature: 1, Seed: uint64(client), HasSeed: true, IgnoreEOS: true}
				opened := time.Now()
				call, err := end.Open(ids.Add(1), s)
				if err != nil {
					b.Error(err)
					return
				}
				var ttft time.Duration
				var itl []time.Duration
				tokens := 0
				last := opened
				for ev := range call.Events() {
					if ev.Err != nil {
						b.Errorf("request failed: %+v", ev.Err)
						return
					}
					if ev.Done != nil {
						break
					}
					now := time.Now()
					if tokens == 0 {
						ttft = now.Sub(opened)
					} else {
						itl = append(itl, now.Sub(last))
					}
					last = now
					tokens += int(ev.Token.Count)
				}
				mu.Lock()
				res.tokens += tokens
				res.ttft = append(res.ttft, ttft)
				res.itl = append(res.itl, itl...)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

func percentile(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
