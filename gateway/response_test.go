package gateway

import (
	"bytes"
	"encoding/json"
	"testing"
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
