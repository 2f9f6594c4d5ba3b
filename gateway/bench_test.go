package gateway

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"h3infer/infer"
	"h3infer/scheduler"
)

// BenchmarkChatStream measures one streamed chat completion of 32 tokens,
// end to end through the real listeners, per protocol. The fake scheduler
// has every token ready, so this is the gateway's own cost per request.
func BenchmarkChatStream(b *testing.B) {
	const n = 32
	h := newHarness(b, nil)
	words := make([]string, n)
	for i := range words {
		words[i] = fmt.Sprintf(" tok%d", i)
	}
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
		return append(tokens(words...), done(infer.FinishStop, 4, n)), nil
	})
	const body = `{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true}`
	for _, proto := range []string{"h3", "h2"} {
		b.Run(proto, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				req, _ := http.NewRequest(http.MethodPost, h.base+"/v1/chat/completions", strings.NewReader(body))
				resp, err := h.clients[proto].Do(req)
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
