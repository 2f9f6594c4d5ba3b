//go:build linux

package transport

import (
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"

	"h3infer/infer"
)

// BenchmarkFirstToken measures a request's path to its first token on the
// real endpoints, with a worker process answering every submit with one
// token and a done: open the call (its channel is allocated here), the
// worker's token back through the receive loop, the consumer taking it and
// the done. channel=16 is the call as it is made now (spill.go);
// channel=257 gives the call a channel of DefaultCallBuffer + 1 events, as
// every call was made before, so the two differ only in what the channel
// costs. parallel runs GOMAXPROCS × 8 requests at a time, as many
// streams opening at once do.
func BenchmarkFirstToken(b *testing.B) {
	for _, mode := range []struct {
		name     string
		channel  int // 0: the end makes it
		parallel bool
	}{
		{"channel=16", 0, false},
		{"channel=257", DefaultCallBuffer + 1, false},
		{"channel=16/parallel", 0, true},
		{"channel=257/parallel", DefaultCallBuffer + 1, true},
	} {
		b.Run(mode.name, func(b *testing.B) {
			g := startTokenGateway(b, GatewayEndConfig{})
			var ids atomic.Uint64
			req := &infer.Request{Prompt: "1"}
			one := func() {
				var sink *infer.Sink
				if mode.channel > 0 {
					sink = &infer.Sink{Events: make(chan infer.Event, mode.channel)}
				}
				c, err := g.OpenSink(ids.Add(1), req, sink)
				if err != nil {
					b.Error(err)
					return
				}
				if ev := <-c.Events(); ev.Token.Count != 1 {
					b.Errorf("first event %+v, want a token", ev)
				}
				if ev := <-c.Events(); ev.Done == nil {
					b.Errorf("second event %+v, want the done", ev)
				}
				c.Cancel()
			}
			b.ReportAllocs()
			if mode.parallel {
				b.SetParallelism(8)
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						one()
					}
				})
				return
			}
			for b.Loop() {
				one()
			}
		})
	}
}

// startTokenGateway runs a GatewayEnd configured by cfg against a worker
// process that answers a submit whose prompt is a number N with N tokens
// and a done (tokenWorker). The cleanup closes both and reaps the worker.
func startTokenGateway(b *testing.B, cfg GatewayEndConfig) *GatewayEnd {
	b.Helper()
	seg, err := NewSegment(0)
	if err != nil {
		b.Fatal(err)
	}
	g := NewGatewayEnd(seg, cfg)
	cmd := startHelper(b, "tokens", seg.File())
	runErr := make(chan error, 1)
	go func() { runErr <- g.Run() }()
	b.Cleanup(func() {
		g.Close()
		<-runErr
		waitHelper(b, cmd)
		seg.Close()
	})
	return g
}

// BenchmarkTokenFlood is BenchmarkGatewayToken with the call's channel
// and bound named: the worker process sends one call b.N tokens as fast as
// it can, and the consumer takes them as they come. channel=16 is the
// call as the end makes it; the other channel size gives the call a
// channel of bound + 1 events (an infer.Sink the benchmark makes), as
// every call had before, so its tokens never wait in the spill queue. A
// consumer that falls bound events behind ends the call with overflow;
// delivered is the fraction of the b.N tokens that came before the end.
func BenchmarkTokenFlood(b *testing.B) {
	for _, bound := range []int{DefaultCallBuffer, 1 << 20} {
		for _, channel := range []int{0, bound + 1} {
			name := fmt.Sprintf("bound=%d/channel=%d", bound, max(channel, callChannel))
			b.Run(name, func(b *testing.B) {
				g := startTokenGateway(b, GatewayEndConfig{CallBuffer: bound})
				var sink *infer.Sink
				if channel > 0 {
					sink = &infer.Sink{Events: make(chan infer.Event, channel)}
				}
				n := b.N
				b.ResetTimer()
				c, err := g.OpenSink(1, &infer.Request{Prompt: strconv.Itoa(n)}, sink)
				if err != nil {
					b.Fatal(err)
				}
				got := 0
				for ev := range c.Events() {
					if ev.Done != nil || ev.Err != nil {
						break
					}
					got++
				}
				b.StopTimer()
				c.Cancel()
				b.ReportMetric(float64(got)/float64(n), "delivered")
			})
		}
	}
}
