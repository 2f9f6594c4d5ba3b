package gateway

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"h3infer/infer"
	"h3infer/scheduler"
)

// discard is a span exporter that drops what it is given, so the benchmark
// measures making and batching spans, not a collector.
type discard struct{}

func (discard) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error { return nil }
func (discard) Shutdown(context.Context) error                             { return nil }

// BenchmarkObservability streams a 32-token chat completion over HTTP/3
// with tracing off (the default no-op provider: the baseline), with
// tracing on and every span sampled, and with all three per-tenant limits
// checked against the in-process store. Run the three side by side:
//
//	go test -run '^$' -bench Observability -benchtime 2s ./gateway/
func BenchmarkObservability(b *testing.B) {
	const n = 32
	words := make([]string, n)
	for i := range words {
		words[i] = fmt.Sprintf(" tok%d", i)
	}
	const body = `{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true}`
	cases := []struct {
		name   string
		mutate func(*Config)
	}{
		{"baseline", nil},
		{"tracing-on", func(c *Config) {
			c.TracerProvider = sdktrace.NewTracerProvider(sdktrace.WithBatcher(discard{}))
		}},
		{"rate-limits", func(c *Config) {
			c.RateLimits.Default = TenantLimit{RequestsPerSecond: 1e9, OutputTokensPerSecond: 1e9, MaxConcurrent: 1 << 20}
		}},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			var cfg Config
			if c.mutate != nil {
				c.mutate(&cfg)
			}
			// The batcher's goroutine starts before the harness counts
			// goroutines and stops after it has checked for leaks.
			if tp, ok := cfg.TracerProvider.(*sdktrace.TracerProvider); ok {
				b.Cleanup(func() { tp.Shutdown(context.Background()) })
			}
			h := newHarness(b, func(c *Config) {
				c.TracerProvider, c.RateLimits = cfg.TracerProvider, cfg.RateLimits
			})
			h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
				return append(tokens(words...), done(infer.FinishStop, 4, n)), nil
			})
			b.ReportAllocs()
			for b.Loop() {
				req, _ := http.NewRequest(http.MethodPost, h.base+"/v1/chat/completions", strings.NewReader(body))
				req.Header.Set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
				resp, err := h.clients["h3"].Do(req)
				if err != nil {
					b.Fatal(err)
				}
				got, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if !strings.HasSuffix(string(got), "data: [DONE]\n\n") {
					b.Fatalf("incomplete stream: %q", got)
				}
			}
		})
	}
}
