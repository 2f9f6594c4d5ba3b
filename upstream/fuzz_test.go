package upstream

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"h3infer/infer"
)

// FuzzStream feeds arbitrary bytes to the SSE reader as an upstream's
// answer: it must end with exactly one of a Done, an error event or an
// overflow, never panic, and never hand on more tokens than it counted.
func FuzzStream(f *testing.F) {
	for _, seed := range []string{
		"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n",
		"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\r\n\r\ndata: [DONE]",
		": keep-alive\n\nevent: x\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n",
		"data: {\"error\":{\"message\":\"x\",\"code\":\"context_length_exceeded\"}}\n\n",
		"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\ndata: more\n\n",
		"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
		"data:" + strings.Repeat("x", 100) + "\n\n",
		"",
	} {
		f.Add([]byte(seed), true, false)
	}
	f.Add([]byte("data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":\"length\"}]}\n\ndata: [DONE]\n\n"), false, false)
	f.Add([]byte("data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"logprobs\":{\"content\":[{\"token\":\"a\",\"logprob\":-1,\"top_logprobs\":[]}]}}]}\n\ndata: [DONE]\n\n"), true, true)
	f.Add([]byte("data: {\"choices\":[{\"text\":\"ab\",\"logprobs\":{\"tokens\":[\"a\",\"b\"],\"token_logprobs\":[-1,-2],\"top_logprobs\":[{\"a\":-1},{\"b\":-2,\"c\":-3}]}}]}\n\ndata: [DONE]\n\n"), false, true)
	cfg := testConfig("fuzz", "http://127.0.0.1:1")
	s, err := NewSet([]Config{cfg}, Options{})
	if err != nil {
		f.Fatal(err)
	}
	defer s.Close()
	h := s.handles()[0]
	f.Fuzz(func(t *testing.T, body []byte, chat, logprobs bool) {
		c := &call{h: h, id: 1, cancel: func(error) {}, events: make(chan infer.Event, 8+1)}
		stall := time.AfterFunc(time.Hour, func() {})
		defer stall.Stop()
		r := c.stream(context.Background(), bytes.NewReader(body), shape{chat: chat, logprobs: logprobs, top: 2}, stall, time.Now())
		ends := 0
		if r.done != nil {
			ends++
		}
		if r.err != nil {
			ends++
		}
		if c.overflowed {
			ends++
		}
		if ends != 1 {
			t.Fatalf("result %+v (overflowed %v): want exactly one end", r, c.overflowed)
		}
		if n := len(c.events); uint32(n) > r.tokens+1 {
			t.Errorf("%d events for %d tokens", n, r.tokens)
		}
	})
}
