package scheduler

import (
	"context"
	"testing"
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
				st, err := s.Submit(context.Background(), req)
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
