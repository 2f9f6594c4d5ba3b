package gateway

import (
	"testing"
)

// BenchmarkRequestStack runs, in a new goroutine each time as quic-go and
// net/http do, what a request does before its first token in the
// gateway's own code: the chat body's decoding, under a stack of the
// handler chain's depth. "grown" grows the stack first, as the handler
// does; "as-is" lets the decoding grow it.
func BenchmarkRequestStack(b *testing.B) {
	body := []byte(`{"model":"demo","messages":[{"role":"system","content":"You are helpful."},{"role":"user","content":"Tell me about HTTP/3 and QUIC in a few words."}],"max_tokens":64,"temperature":0.7,"stream":true,"stream_options":{"include_usage":true}}`)
	for _, c := range []struct {
		name string
		grow bool
	}{{"as-is", false}, {"grown", true}} {
		b.Run(c.name, func(b *testing.B) {
			done := make(chan error)
			b.ReportAllocs()
			for b.Loop() {
				go func() {
					if c.grow {
						growStack()
					}
					done <- handlerDepth(24, func() error {
						_, err := parseCompletion(body, kindChat, DefaultMaxTokens)
						return err
					})
				}()
				if err := <-done; err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// handlerDepth calls f under n frames of about the size of the handler
// chain's (http3's stream handling, the mux and the middleware).
//
//go:noinline
func handlerDepth(n int, f func() error) error {
	var pad [96]byte
	if n == 0 {
		return f()
	}
	err := handlerDepth(n-1, f)
	touchStack(pad[:])
	return err
}
