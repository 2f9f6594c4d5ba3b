package tokenize

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// Generated ids streamed as a worker streams them, piece by piece through
// a Stream, with real tokenizers of both kinds: every event is whole UTF-8
// (byte-fallback and byte-level tokens split characters), the text is what
// decoding the whole sequence after a prompt gives, and a stop string that
// spans tokens ends it exactly where it begins.
func TestStreamRealTokenizers(t *testing.T) {
	const text = " The answer is 42 — naïve café, 你好世界 🤗👩‍💻 and\ttabs\n  then STOP here, not STOP again"
	for _, model := range refModels {
		t.Run(model, func(t *testing.T) {
			tok := loadRef(t, model)
			// A one-token prompt, so the pieces continue a text as
			// generated tokens do (no decoder's start-of-text rule).
			prompt := tok.Encode("Q")
			ids := tok.Encode(text)
			whole := tok.Decode(append(append([]int(nil), prompt...), ids...), true)
			want, ok := strings.CutPrefix(whole, tok.Decode(prompt, true))
			if !ok {
				t.Fatalf("decoding the prompt %q is no prefix of the whole %q", tok.Decode(prompt, true), whole)
			}
			for _, stops := range [][]string{nil, {"STOP"}, {"is 42", "STOP"}, {"界 🤗"}, {"never"}} {
				s := NewStream(stops)
				var got strings.Builder
				stopped := false
				for _, id := range ids {
					out, stop := s.Push(tok.Piece(id))
					if !utf8.ValidString(out) {
						t.Errorf("stops %q: event %q is not whole UTF-8", stops, out)
					}
					got.WriteString(out)
					if stop {
						stopped = true
						break
					}
				}
				if !stopped {
					got.WriteString(s.Flush())
				}
				expect, cut := want, len(want)
				for _, st := range stops {
					if i := strings.Index(want, st); i >= 0 && i < cut {
						cut = i
					}
				}
				expect = want[:cut]
				if got.String() != expect || stopped != (cut < len(want)) {
					t.Errorf("stops %q: streamed %q (stopped %v)\nwant %q", stops, got.String(), stopped, expect)
				}
			}
		})
	}
}
