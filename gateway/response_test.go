package gateway

import (
	"bytes"
	"encoding/json"
	"slices"
	"testing"

	"h3infer/infer"
)

// TestTokenEventMatchesMarshal: the pre-rendered token event is byte for
// byte what encoding/json makes of the whole chunk, escapes included.
func TestTokenEventMatchesMarshal(t *testing.T) {
	texts := []string{"", " tok", "Hello", `"quoted"`, `back\slash`, "<b>&amp;</b>", "tab\there\nline",
		"\x00\x1f\x7f", "héllo wörld", "日本語", "\u2028\u2029", "bad \xff utf8", "\\u0000", "emoji 🎉"}
	for _, kind := range []apiKind{kindChat, kindText} {
		for _, model := range []string{"demo", `we"ird<model>`, "\x00"} {
			e := newEncoder(kind, model, 1700000000)
			for _, text := range texts {
				if got, want := e.token(text), e.tokenSlow(text); !bytes.Equal(got, want) {
					t.Errorf("kind %v model %q text %q:\n got %s\nwant %s", kind, model, text, got, want)
				}
			}
		}
	}
	// The event still parses as the chunk it claims to be.
	var c struct {
		Choices []struct {
			Delta struct {
				Content string `json:"content"`
			} `json:"delta"`
		} `json:"choices"`
	}
	b := newEncoder(kindChat, "demo", 1).token(`say "hi"`)
	if err := json.Unmarshal(bytes.TrimSuffix(bytes.TrimPrefix(b, []byte("data: ")), []byte("\n\n")), &c); err != nil || c.Choices[0].Delta.Content != `say "hi"` {
		t.Errorf("token event %s: %v, %+v", b, err, c)
	}
}

func FuzzTokenEvent(f *testing.F) {
	for _, s := range []string{" tok", "<&>", "\xff", "\u2028", `"\`} {
		f.Add(s, "demo")
	}
	f.Fuzz(func(t *testing.T, text, model string) {
		for _, kind := range []apiKind{kindChat, kindText} {
			e := newEncoder(kind, model, 1)
			if got, want := e.token(text), e.tokenSlow(text); !bytes.Equal(got, want) {
				t.Fatalf("kind %v model %q text %q:\n got %s\nwant %s", kind, model, text, got, want)
			}
		}
	})
}

// BenchmarkTokenEvent compares the pre-rendered token event with the
// reflective encoding it replaced, in the same run.
func BenchmarkTokenEvent(b *testing.B) {
	e := newEncoder(kindChat, "demo", 1700000000)
	for _, bc := range []struct {
		name   string
		render func(string) []byte
	}{{"marshal", e.tokenSlow}, {"prerendered", e.token}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				bc.render(" tok")
			}
		})
	}
}

// TestLogprobsShapes: a token event with logprobs, and the end that
// carries those of text never sent, in OpenAI's chat and legacy shapes.
func TestLogprobsShapes(t *testing.T) {
	lps := []infer.TokenLogprob{
		{Token: "Hi", Logprob: -0.5, Top: []infer.TopLogprob{{Token: "Hi", Logprob: -0.5}, {Token: "Yo", Logprob: -1.25}}},
		{Token: "\xe2\x9c", Logprob: -2}, // the first bytes of "✓": the bytes say what the text cannot
	}
	payload := func(b []byte) []byte { return bytes.TrimSuffix(bytes.TrimPrefix(b, []byte("data: ")), []byte("\n\n")) }

	chat := newEncoder(kindChat, "demo", 1)
	b, _ := chat.tokenWithLogprobs("Hi", lps, 0)
	var c struct {
		Choices []struct {
			Logprobs struct {
				Content []struct {
					Token       string  `json:"token"`
					Logprob     float64 `json:"logprob"`
					Bytes       []int   `json:"bytes"`
					TopLogprobs []struct {
						Token   string  `json:"token"`
						Logprob float64 `json:"logprob"`
					} `json:"top_logprobs"`
				} `json:"content"`
				Refusal any `json:"refusal"`
			} `json:"logprobs"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(payload(b), &c); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	got := c.Choices[0].Logprobs
	if len(got.Content) != 2 || got.Content[0].Token != "Hi" || got.Content[0].Logprob != -0.5 ||
		len(got.Content[0].TopLogprobs) != 2 || got.Content[0].TopLogprobs[1].Token != "Yo" || got.Content[0].TopLogprobs[1].Logprob != -1.25 ||
		!slices.Equal(got.Content[1].Bytes, []int{0xe2, 0x9c}) || got.Content[1].TopLogprobs == nil || got.Refusal != nil {
		t.Errorf("chat logprobs %s: got %+v", b, got)
	}
	if b := chat.token("x"); !bytes.Contains(b, []byte(`"logprobs":null`)) {
		t.Errorf("a token event without logprobs should say null: %s", b)
	}

	text := newEncoder(kindText, "demo", 1)
	b, next := text.tokenWithLogprobs("Hi", lps, 3)
	var tc struct {
		Choices []struct {
			Logprobs struct {
				Tokens        []string             `json:"tokens"`
				TokenLogprobs []float64            `json:"token_logprobs"`
				TopLogprobs   []map[string]float64 `json:"top_logprobs"`
				TextOffset    []int                `json:"text_offset"`
			} `json:"logprobs"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(payload(b), &tc); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	tl := tc.Choices[0].Logprobs
	if !slices.Equal(tl.TokenLogprobs, []float64{-0.5, -2}) || !slices.Equal(tl.TextOffset, []int{3, 5}) || next != 7 ||
		len(tl.TopLogprobs) != 2 || tl.TopLogprobs[0]["Yo"] != -1.25 || len(tl.TopLogprobs[1]) != 0 {
		t.Errorf("text logprobs %s: got %+v, next offset %d", b, tl, next)
	}
	end := text.finish("stop", lps[1:], 5)
	if !bytes.Contains(end, []byte(`"token_logprobs":[-2]`)) || !bytes.Contains(end, []byte(`"finish_reason":"stop"`)) {
		t.Errorf("the end should carry the held-back token's logprobs: %s", end)
	}
}
