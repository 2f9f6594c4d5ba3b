package tokenize

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"h3infer/internal/onnxgen"
)

func testTokenizer(t testing.TB) *Tokenizer {
	t.Helper()
	tok, err := Load("testdata/tokenizer.json")
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestSplitWords(t *testing.T) {
	tests := map[string]struct {
		in   string
		want []string
	}{
		"words":            {"Hello world", []string{"Hello", " world"}},
		"contractions":     {"I'm can't we'll", []string{"I", "'m", " can", "'t", " we", "'ll"}},
		"numbers":          {"in 2024, ok", []string{"in", " 2024", ",", " ok"}},
		"punctuation run":  {"wait!!! ?", []string{"wait", "!!!", " ?"}},
		"spaces before":    {"a   b", []string{"a", "  ", " b"}},
		"trailing spaces":  {"a  ", []string{"a", "  "}},
		"newline word":     {"a\nb", []string{"a", "\n", "b"}},
		"newlines":         {"a\n\n b", []string{"a", "\n\n", " b"}},
		"tab before space": {"x\t y", []string{"x", "\t", " y"}},
		"unicode":          {"héllo 世界", []string{"héllo", " 世界"}},
		"apostrophe other": {"!'s", []string{"!'", "s"}},
		"space apostrophe": {" 're", []string{" '", "re"}},
		"invalid utf8":     {"a\xffb", []string{"a", "\xff", "b"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got := slices.Collect(splitWords(tc.in))
			if !slices.Equal(got, tc.want) {
				t.Errorf("splitWords(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

func TestEncode(t *testing.T) {
	tok := testTokenizer(t)
	id := func(s string) int {
		v, ok := tok.TokenID(s)
		if !ok {
			t.Fatalf("no token %q", s)
		}
		return v
	}
	tests := map[string]struct {
		in   string
		want []int
	}{
		"merges by rank": {"the and", []int{'t', id("he"), id("Ġand")}},
		"leading space":  {" the", []int{id("Ġthe")}},
		"special split":  {"a<|endoftext|>b", []int{'a', id("<|endoftext|>"), 'b'}},
		"special alone":  {"<|im_start|>", []int{id("<|im_start|>")}},
		"bytes":          {"é", []int{0xC3, 0xA9}},
		"empty":          {"", nil},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := tok.Encode(tc.in); !slices.Equal(got, tc.want) {
				t.Errorf("encode(%q) = %v, want %v", tc.in, got, tc.want)
			}
		})
	}
}

func TestMergeSpellings(t *testing.T) {
	a := testTokenizer(t)
	b, err := Load("testdata/tokenizer-pair-merges.json")
	if err != nil {
		t.Fatal(err)
	}
	s := "the and then\n\n  in there"
	if got, want := b.Encode(s), a.Encode(s); !slices.Equal(got, want) {
		t.Errorf("pair merges give %v, string merges %v", got, want)
	}
}

func TestParseTokenizerErrors(t *testing.T) {
	base, err := os.ReadFile("testdata/tokenizer.json")
	if err != nil {
		t.Fatal(err)
	}
	tests := map[string]struct {
		from, to string
		want     string
	}{
		"not bpe":        {`"type":"BPE"`, `"type":"WordPiece"`, `model.type: "WordPiece" is not supported`},
		"normalizer":     {`"normalizer":null`, `"normalizer":{"type":"Precompiled"}`, `normalizer.type: "Precompiled" is not supported`},
		"nested pre":     {`"pre_tokenizer":{"type":"ByteLevel"`, `"pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Digits"},{"type":"Foo"}]},"x":{"type":"ByteLevel"`, `pre_tokenizer.pretokenizers[1].type: "Foo" is not supported`},
		"decoder":        {`"decoder":{"type":"ByteLevel"`, `"decoder":{"type":"CTC"`, `decoder.type: "CTC" is not supported`},
		"post-processor": {`"post_processor":{"type":"ByteLevel"`, `"post_processor":{"type":"Foo"`, `post_processor.type: "Foo" is not supported`},
		"look-behind":    {`"pre_tokenizer":{"type":"ByteLevel"`, `"pre_tokenizer":{"type":"Split","behavior":"Isolated","pattern":{"Regex":"(?<=a)b"}},"x":{"type":"ByteLevel"`, "pre_tokenizer.pattern"},
		"dropout":        {`"dropout":null`, `"dropout":0.1`, "model.dropout"},
		"bad merge":      {`"merges":["Ġ t"`, `"merges":["Ġt"`, "model.merges[0]"},
		"not json":       {`{`, `[`, "decode tokenizer.json"},
		"merge unknown":  {`"merges":["Ġ t"`, `"merges":["x y"`, "not in the vocabulary"},
		"truncation":     {`"truncation":null`, `"truncation":{}`, "truncation"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			data := strings.Replace(string(base), tc.from, tc.to, 1)
			if data == string(base) {
				t.Fatalf("test edit %q did not apply", tc.from)
			}
			_, err := Parse([]byte(data))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got error %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

// roundTripSeeds are texts every tokenizer fuzz target starts from.
var roundTripSeeds = []string{
	"", "the and then", "Hello, world! It's 2024.\n\n  Indented\ttab",
	"héllo 世界 🙂", "<|endoftext|>x<|im_start|>", "a\xffb", "'s'S 've", "   \n \n",
}

func FuzzTokenizerRoundTrip(f *testing.F) {
	for _, s := range roundTripSeeds {
		f.Add(s)
	}
	tok := testTokenizer(f)
	f.Fuzz(func(t *testing.T, s string) {
		ids := tok.Encode(s)
		if got := tok.Decode(ids, false); got != s && utf8.ValidString(s) {
			t.Fatalf("decode(encode(%q)) = %q", s, got)
		}
		// Streaming in token steps gives the same text when it is valid
		// UTF-8; the stream only ever emits valid UTF-8.
		ts := NewStream(nil)
		var b strings.Builder
		for _, id := range ids {
			out, _ := ts.Push(tok.Piece(id))
			if !utf8.ValidString(out) {
				t.Fatalf("stream emitted invalid UTF-8 %q", out)
			}
			b.WriteString(out)
		}
		b.WriteString(ts.Flush())
		if want := strings.ToValidUTF8(s, "\uFFFD"); utf8.ValidString(s) && b.String() != want {
			t.Fatalf("streamed %q, want %q", b.String(), want)
		}
	})
}

func FuzzParseTokenizer(f *testing.F) {
	for _, name := range []string{"testdata/tokenizer.json", "testdata/tokenizer-pair-merges.json", "testdata/tokenizer-pipeline.json"} {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data, "the and")
	}
	f.Add([]byte(`{"model":{"type":"BPE"}}`), "x")
	f.Fuzz(func(t *testing.T, data []byte, s string) {
		tok, err := Parse(data)
		if err != nil {
			return
		}
		// Whatever the pipeline, encoding gives ids that decode, and
		// every id has a piece.
		ids := tok.EncodeSpecial(s)
		for _, id := range ids {
			if id < 0 || id >= tok.VocabSize() {
				t.Fatalf("encode(%q) gave id %d outside the vocabulary of %d", s, id, tok.VocabSize())
			}
			tok.Piece(id)
		}
		tok.Decode(ids, true)
		tok.Decode(ids, false)
	})
}

func BenchmarkEncodeDemo(b *testing.B) {
	tok := testTokenizer(b)
	text := strings.Repeat("The gateway streams tokens and the worker is near the model. ", 20)
	b.SetBytes(int64(len(text)))
	for b.Loop() {
		tok.Encode(text)
	}
}

// A tokenizer with real merges, learned from the demo corpus by onnxgen:
// encoding applies them (far fewer tokens than bytes), decoding restores
// the bytes, added tokens stay whole, and every merged token is one the
// merges can build.
func TestLearnedMerges(t *testing.T) {
	dir := t.TempDir()
	if err := onnxgen.Write(dir, onnxgen.Options{Merges: 400, SpecialTokens: []string{"<|im_start|>", "<|im_end|>"}}); err != nil {
		t.Fatal(err)
	}
	tok, err := Load(filepath.Join(dir, onnxgen.TokenizerFile))
	if err != nil {
		t.Fatal(err)
	}
	// The corpus is short: learning stops when no pair repeats.
	if len(tok.model.merges) < 200 {
		t.Fatalf("%d merges, want at least 200", len(tok.model.merges))
	}
	text := "The gateway sits at the edge of the network, close to the people who send it questions."
	ids := tok.Encode(text)
	if got := tok.Decode(ids, false); got != text {
		t.Errorf("round trip: %q", got)
	}
	if len(ids) > len(text)/2 {
		t.Errorf("%d tokens for %d bytes: merges were not applied", len(ids), len(text))
	}
	// Common words of the corpus are single tokens, with their space.
	for _, w := range []string{" the", "The", " gateway"} {
		if got := tok.Encode(w); len(got) != 1 {
			t.Errorf("%q encodes to %d tokens %v, want 1", w, len(got), got)
		}
	}
	chat := "<|im_start|>user\nthe gateway<|im_end|>"
	ids = tok.Encode(chat)
	start, _ := tok.TokenID("<|im_start|>")
	end, _ := tok.TokenID("<|im_end|>")
	if ids[0] != start || ids[len(ids)-1] != end || tok.Decode(ids, false) != chat {
		t.Errorf("added tokens: %v", ids)
	}
}
