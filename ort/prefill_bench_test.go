package ort

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"h3infer/internal/onnxgen"
)

// prefillPrompt is prose of the kind a chat user pastes, repeated until it
// is long enough.
const prefillPrompt = `The gateway terminates HTTP/3 at the edge, close to the user, and forwards each request to a worker process that runs the model. ` +
	`Tokens stream back as they are sampled; a phone on a lossy link sees the first one within a round trip of the server deciding it. ` +
	"Numbers like 3.14159, 2,048 and 1e-9 appear, as do names (Zoë, Łódź, São Paulo) and code: `for i := range n { sum += x[i] }`.\n\n"

// BenchmarkPrefill2000 splits the time to first token of a 2,000-token
// prompt into its two parts: the tokenizer turning the text into ids and
// the model's forward pass over them. The tokenizer is llama 2's
// SentencePiece-style one, from the reference files `make js` installs;
// the weights are random, 4 layers of width 512.
func BenchmarkPrefill2000(b *testing.B) {
	src := filepath.Join("..", "tokenize", "testdata", "ref", "node_modules", "@lenml", "tokenizer-llama2", "models")
	if _, err := os.Stat(src); err != nil {
		b.Fatalf("%v: run `make js` first, which installs the reference tokenizers", err)
	}
	m := loadRandomModel(b, onnxgen.Options{Layers: 4, Heads: 8, Hidden: 512, Context: 4096, Seed: 1, Tokenizer: src})
	const tokens = 2000
	text := strings.Repeat(prefillPrompt, 2*tokens/len(m.Encode(prefillPrompt))+1)
	// Cut the text where it reaches the token count, so both parts work
	// on the same 2,000 tokens.
	lo, hi := 0, len(text)
	for lo < hi {
		mid := (lo + hi) / 2
		if len(m.Encode(text[:mid])) < tokens {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	text = text[:lo]
	ids := m.Encode(text)
	b.Run("part=tokenize", func(b *testing.B) {
		b.SetBytes(int64(len(text)))
		for b.Loop() {
			m.Encode(text)
		}
		b.ReportMetric(float64(len(ids)), "tokens")
	})
	b.Run("part=model", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := m.Prefill(ids); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(len(ids)), "tokens")
	})
}
