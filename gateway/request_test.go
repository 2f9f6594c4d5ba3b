package gateway

import (
	"math"
	"os"
	"path/filepath"
	"testing"
)

// FuzzParseCompletion checks that any body either fails with an error the
// client can act on or yields a job within the documented bounds.
func FuzzParseCompletion(f *testing.F) {
	seeds, err := filepath.Glob("testdata/requests/*.json")
	if err != nil {
		f.Fatal(err)
	}
	for _, name := range seeds {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false)
		f.Add(b, true)
	}
	f.Fuzz(func(t *testing.T, body []byte, text bool) {
		kind := kindChat
		if text {
			kind = kindText
		}
		c, err := parseCompletion(body, kind, DefaultMaxTokens)
		if err != nil {
			if e := apiErrorOf(err); e.status != 400 {
				t.Fatalf("a bad body maps to %d, want 400: %v", e.status, err)
			}
			return
		}
		j := c.job
		if c.model == "" || j.Model != c.model {
			t.Errorf("model %q job model %q", c.model, j.Model)
		}
		if j.MaxTokens == 0 {
			t.Error("max tokens 0")
		}
		if math.IsNaN(float64(j.Temperature)) || j.Temperature < 0 || j.Temperature > 2 {
			t.Errorf("temperature %v", j.Temperature)
		}
		if !(j.TopP > 0 && j.TopP <= 1) {
			t.Errorf("top_p %v", j.TopP)
		}
		if len(j.Stop) > maxStopSequences {
			t.Errorf("%d stop sequences", len(j.Stop))
		}
		if kind == kindChat && len(j.Messages) == 0 {
			t.Error("chat job without messages")
		}
		if kind == kindText && j.Messages != nil {
			t.Error("text job with messages")
		}
		if c.includeUsage && !c.stream {
			t.Error("include_usage without stream")
		}
	})
}

func TestSeedRequestsParse(t *testing.T) {
	tests := map[string]struct {
		kind apiKind
		ok   bool
	}{
		"chat_stream.json": {kindChat, true},
		"chat_parts.json":  {kindChat, true},
		"text_array.json":  {kindText, true},
		"text_nulls.json":  {kindText, true},
		"chat_edge.json":   {kindChat, false}, // max_tokens beyond uint32
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("testdata/requests", name))
			if err != nil {
				t.Fatal(err)
			}
			_, err = parseCompletion(b, tc.kind, DefaultMaxTokens)
			if (err == nil) != tc.ok {
				t.Errorf("parse error %v, want ok=%v", err, tc.ok)
			}
		})
	}
}
