package scheduler

import (
	"context"
	"sync"
	"testing"

	"h3infer/infer"
)

// BenchmarkSubmitClose measures the scheduler's own cost per request: admit,
// pick a worker, open (a fake call), close and release.
func BenchmarkSubmitClose(b *testing.B) {
	for _, bc := range []struct {
		name     string
		parallel bool
	}{{"serial", false}, {"parallel", true}} {
		b.Run(bc.name, func(b *testing.B) {
			s, _ := newTestScheduler(b, Config{MaxQueue: 1 << 16}, newFakeWorker(0, 8), newFakeWorker(1, 8))
			req := &Request{}
			run := func() {
				st, _, err := s.Submit(context.Background(), req)
				if err != nil {
					b.Error(err)
					return
				}
				st.Close()
			}
			b.ReportAllocs()
			if bc.parallel {
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						run()
					}
				})
				return
			}
			for b.Loop() {
				run()
			}
		})
	}
}

// BenchmarkFairness floods the queue with two tenants' requests (400 each,
// 64 tokens asked) behind eight busy slots, then lets them through and
// reports the tokens served to a over those served to b during the first
// 200 dispatches, while both still have a backlog. Weights 3:1 should give
// about 3; the 1:1 run beside it is the baseline. Run with -benchtime 1x.
func BenchmarkFairness(b *testing.B) {
	for _, bc := range []struct {
		name   string
		weight int
	}{{"weights_3_to_1", 3}, {"weights_1_to_1", 1}} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				b.ReportMetric(fairnessRatio(b, bc.weight), "a/b_tokens")
			}
		})
	}
}

func fairnessRatio(b *testing.B, weightA int) float64 {
	const perTenant, sample, maxTokens = 400, 200, 64
	cfg := Config{MaxQueue: 2 * perTenant, Tenants: []Tenant{
		{Name: "a", Weight: weightA, DefaultUrgency: 4},
		{Name: "b", Weight: 1, DefaultUrgency: 4},
	}}
	s, _ := newTestScheduler(b, cfg, newFakeWorker(0, 4), newFakeWorker(1, 4))
	var holders []*Dispatch
	for range 8 {
		st, _, err := s.Submit(context.Background(), &Request{})
		if err != nil {
			b.Fatal(err)
		}
		holders = append(holders, st)
	}
	var (
		mu     sync.Mutex
		served []string
		wg     sync.WaitGroup
	)
	for _, tenant := range []string{"a", "b"} {
		for range perTenant {
			wg.Go(func() {
				st, _, err := s.Submit(context.Background(), &Request{Tenant: tenant, DefaultUrgency: true, Job: infer.Request{MaxTokens: maxTokens}})
				if err != nil {
					b.Error(err)
					return
				}
				mu.Lock()
				served = append(served, tenant)
				mu.Unlock()
				st.Close()
			})
		}
	}
	waitFor(b, "the flood to queue", func() bool { return s.Stats().Queued == 2*perTenant })
	for _, h := range holders {
		h.Close()
	}
	wg.Wait()
	tokens := map[string]int{}
	for _, t := range served[:sample] {
		tokens[t] += maxTokens
	}
	return float64(tokens["a"]) / float64(tokens["b"])
}
