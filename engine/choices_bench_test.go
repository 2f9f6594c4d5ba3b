package engine

import (
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/internal/onnxgen"
	"h3infer/transport"
)

// BenchmarkChoicesSharedPrefill answers one long prompt with 4 sampled
// completions of 16 tokens, over a real ring, two ways in the same run:
// as 4 separate requests sent at once (each prefilled, then batched
// together) and as one request with n=4 (prefilled once, its cache copied
// into the other 3 rows). Each reports the time per answer of 4
// completions, the time until all 4 have their first token, the prompt
// tokens the worker prefilled per answer (from its own counters), and
// n=4's time as a fraction of the 4 requests' (x_separate); the demo
// model and a random model of hidden size 512 and 4 layers, whose
// prefill costs more.
//
//	go test -run '^$' -bench ChoicesSharedPrefill ./engine/
func BenchmarkChoicesSharedPrefill(b *testing.B) {
	needModel(b)
	dir := filepath.Join(b.TempDir(), "h512l4")
	if err := onnxgen.Write(dir, onnxgen.Options{Random: true, Layers: 4, Heads: 8, Hidden: 512, Seed: 1}); err != nil {
		b.Fatal(err)
	}
	prompt := strings.Repeat("The gateway hands each request to a worker over a shared-memory ring. ", 20)
	for _, model := range []struct{ name, dir string }{{"demo", demo.ModelDir()}, {"h512l4", dir}} {
		b.Run("model="+model.name, func(b *testing.B) {
			rw := startRingWorkerWith(b, 8, model.dir, 0)
			var ids atomic.Uint64
			var separate time.Duration
			for _, mode := range []string{"4 requests", "n=4"} {
				b.Run("mode="+mode, func(b *testing.B) {
					base := infer.Request{Model: "demo", Prompt: prompt, MaxTokens: 16, IgnoreEOS: true, Temperature: 1, Seed: 1, HasSeed: true}
					var subs []infer.Request
					if mode == "n=4" {
						s := base
						s.N = 4
						subs = []infer.Request{s}
					} else {
						for i := range 4 {
							s := base
							s.Seed = infer.ChoiceSeed(base.Seed, i)
							subs = append(subs, s)
						}
					}
					before := rw.latestStats()
					var firstAll time.Duration
					start := time.Now()
					for b.Loop() {
						firstAll += answerAll(b, rw.end, &ids, subs)
					}
					per := time.Since(start) / time.Duration(b.N)
					// The worker reports its counters once idle.
					after := rw.latestStats()
					for deadline := time.Now().Add(10 * time.Second); after.SequencesFinished-before.SequencesFinished < uint64(b.N*len(subs)); after = rw.latestStats() {
						if time.Now().After(deadline) {
							b.Fatalf("the worker reported %d requests finished, want %d", after.SequencesFinished-before.SequencesFinished, b.N*len(subs))
						}
						time.Sleep(5 * time.Millisecond)
					}
					b.ReportMetric(float64(after.PrefillTokens-before.PrefillTokens)/float64(b.N), "prefill_tokens/op")
					b.ReportMetric(ms(firstAll/time.Duration(b.N)), "first_all_ms")
					b.ReportMetric(4*16/per.Seconds(), "tok/s")
					if mode == "4 requests" {
						separate = per
					} else if separate > 0 {
						b.ReportMetric(float64(per)/float64(separate), "x_separate")
					}
				})
			}
		})
	}
}

// answerAll sends subs at once and waits for all of them to end; it
// returns how long until every completion (every choice) had its first
// token.
func answerAll(b *testing.B, end *transport.GatewayEnd, ids *atomic.Uint64, subs []infer.Request) time.Duration {
	start := time.Now()
	var mu sync.Mutex
	var lastFirst time.Duration
	var wg sync.WaitGroup
	for i := range subs {
		c, err := end.Open(ids.Add(1), &subs[i])
		if err != nil {
			b.Fatal(err)
		}
		wg.Go(func() {
			seen := map[uint32]bool{}
			for ev := range c.Events() {
				if ev.Err != nil {
					b.Errorf("request: %+v", ev.Err)
				}
				if ev.Done == nil && ev.Err == nil && !seen[ev.Token.Index] {
					seen[ev.Token.Index] = true
					mu.Lock()
					lastFirst = max(lastFirst, time.Since(start))
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	return lastFirst
}
