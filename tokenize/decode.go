package tokenize

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// A decoder turns the token strings of ids back into text. Hugging Face
// runs a chain of them over the whole list of tokens; each may look at a
// token's place in the list (the first token loses its prefix space) and
// Fuse joins the list into one string.
type decoder interface {
	decodeChain(toks []string) []string
}

type (
	byteLevelDec struct{}
	metaspaceDec struct {
		rep     string
		prepend bool // prepend_scheme other than "never"
	}
	byteFallbackDec struct{}
	fuseDec         struct{}
	stripDec        struct {
		content     rune
		start, stop int
	}
	replaceDec struct {
		p    *pattern
		with string
	}
	decoderSeq []decoder
)

func (byteLevelDec) decodeChain(toks []string) []string {
	var b []byte
	for _, t := range toks {
		b = appendFromByteLevel(b, t)
	}
	return []string{lossyUTF8(b)}
}

func (m metaspaceDec) decodeChain(toks []string) []string {
	for i, t := range toks {
		with := " "
		if i == 0 && m.prepend {
			with = ""
		}
		toks[i] = strings.ReplaceAll(t, m.rep, with)
	}
	return toks
}

// byteToken returns the byte a <0xNN> token stands for.
func byteToken(t string) (byte, bool) {
	if len(t) != 6 || !strings.HasPrefix(t, "<0x") || t[5] != '>' {
		return 0, false
	}
	v, err := strconv.ParseUint(t[3:5], 16, 8)
	if err != nil {
		return 0, false
	}
	return byte(v), true
}

func (byteFallbackDec) decodeChain(toks []string) []string {
	out := toks[:0:0]
	var pending []byte
	flush := func() {
		if len(pending) == 0 {
			return
		}
		if utf8.Valid(pending) {
			out = append(out, string(pending))
		} else {
			for range pending {
				out = append(out, "\uFFFD")
			}
		}
		pending = pending[:0]
	}
	for _, t := range toks {
		if b, ok := byteToken(t); ok {
			pending = append(pending, b)
			continue
		}
		flush()
		out = append(out, t)
	}
	flush()
	return out
}

func (fuseDec) decodeChain(toks []string) []string {
	return []string{strings.Join(toks, "")}
}

func (s stripDec) decodeChain(toks []string) []string {
	for i, t := range toks {
		toks[i] = s.strip(t)
	}
	return toks
}

func (s stripDec) strip(t string) string {
	for range s.start {
		r, n := utf8.DecodeRuneInString(t)
		if n == 0 || r != s.content {
			break
		}
		t = t[n:]
	}
	for range s.stop {
		r, n := utf8.DecodeLastRuneInString(t)
		if n == 0 || r != s.content {
			break
		}
		t = t[:len(t)-n]
	}
	return t
}

func (r replaceDec) decodeChain(toks []string) []string {
	for i, t := range toks {
		toks[i] = r.p.replaceAll(t, r.with)
	}
	return toks
}

func (q decoderSeq) decodeChain(toks []string) []string {
	for _, d := range q {
		toks = d.decodeChain(toks)
	}
	return toks
}

// pieceOf is the text token t adds when it follows other tokens: each
// decoder's work on a token that is not the first. Fusing decoders
// (Fuse, ByteLevel) end the per-token work for those after them, except
// the ones that act on every token alike.
func pieceOf(d decoder, t string) string {
	p, _ := pieceStep(d, t, false)
	return p
}

func pieceStep(d decoder, t string, fused bool) (string, bool) {
	switch d := d.(type) {
	case byteLevelDec:
		return string(appendFromByteLevel(nil, t)), true
	case metaspaceDec:
		return strings.ReplaceAll(t, d.rep, " "), fused
	case byteFallbackDec:
		if b, ok := byteToken(t); ok {
			return string([]byte{b}), fused
		}
		return t, fused
	case fuseDec:
		return t, true
	case stripDec:
		// After fusing, Strip trims only the ends of the whole text.
		if fused {
			return t, fused
		}
		return d.strip(t), fused
	case replaceDec:
		return d.p.replaceAll(t, d.with), fused
	case decoderSeq:
		for _, sub := range d {
			t, fused = pieceStep(sub, t, fused)
		}
		return t, fused
	}
	return t, fused
}

// lossyUTF8 replaces each maximal invalid subsequence of b with U+FFFD, as
// Rust's String::from_utf8_lossy does (Go's ToValidUTF8 would replace a
// whole run of them with one).
func lossyUTF8(b []byte) string {
	if utf8.Valid(b) {
		return string(b)
	}
	var out strings.Builder
	for len(b) > 0 {
		r, n := utf8.DecodeRune(b)
		if r != utf8.RuneError || n > 1 {
			out.Write(b[:n])
			b = b[n:]
			continue
		}
		out.WriteRune(utf8.RuneError)
		b = b[invalidPrefix(b):]
	}
	return out.String()
}

// invalidPrefix is the length of the maximal prefix of b that could begin
// a UTF-8 sequence but does not complete one (at least 1).
func invalidPrefix(b []byte) int {
	lo, hi := byte(0x80), byte(0xBF)
	need := 0
	switch c := b[0]; {
	case c >= 0xC2 && c <= 0xDF:
		need = 1
	case c == 0xE0:
		need, lo = 2, 0xA0
	case c == 0xED:
		need, hi = 2, 0x9F
	case c >= 0xE1 && c <= 0xEF:
		need = 2
	case c == 0xF0:
		need, lo = 3, 0x90
	case c == 0xF4:
		need, hi = 3, 0x8F
	case c >= 0xF1 && c <= 0xF3:
		need = 3
	default:
		return 1
	}
	n := 1
	for ; n <= need && n < len(b); n++ {
		if b[n] < lo || b[n] > hi {
			break
		}
		lo, hi = 0x80, 0xBF
	}
	return n
}

type decoderJSON struct {
	Type          string            `json:"type"`
	Decoders      []json.RawMessage `json:"decoders"`
	Replacement   *string           `json:"replacement"`
	PrependScheme *string           `json:"prepend_scheme"`
	AddPrefixSpc  *bool             `json:"add_prefix_space"`
	Pattern       *patternJSON      `json:"pattern"`
	Content       *string           `json:"content"`
	Start         int               `json:"start"`
	Stop          int               `json:"stop"`
}

// parseDecoder reads the decoder at path; null is none.
func parseDecoder(raw []byte, path string) (decoder, error) {
	if isNull(raw) {
		return nil, nil
	}
	var j decoderJSON
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	switch j.Type {
	case "ByteLevel":
		return byteLevelDec{}, nil
	case "ByteFallback":
		return byteFallbackDec{}, nil
	case "Fuse":
		return fuseDec{}, nil
	case "Metaspace":
		m, err := metaspaceConfig(&preTokenizerJSON{Replacement: j.Replacement, PrependScheme: j.PrependScheme, AddPrefixSpace: j.AddPrefixSpc}, path)
		if err != nil {
			return nil, err
		}
		return metaspaceDec{rep: m.rep, prepend: m.prependAll || m.prependFst}, nil
	case "Strip":
		if j.Content == nil || utf8.RuneCountInString(*j.Content) != 1 {
			return nil, fmt.Errorf("%s.content: want one character", path)
		}
		if j.Start < 0 || j.Stop < 0 {
			return nil, fmt.Errorf("%s: start and stop must be >= 0", path)
		}
		r, _ := utf8.DecodeRuneInString(*j.Content)
		return stripDec{content: r, start: j.Start, stop: j.Stop}, nil
	case "Replace":
		p, err := j.Pattern.compile(path)
		if err != nil {
			return nil, err
		}
		with := ""
		if j.Content != nil {
			with = *j.Content
		}
		return replaceDec{p, with}, nil
	case "Sequence":
		var seq decoderSeq
		var errs []error
		for i, sub := range j.Decoders {
			d, err := parseDecoder(sub, fmt.Sprintf("%s.decoders[%d]", path, i))
			if err != nil {
				errs = append(errs, err)
			} else if d != nil {
				seq = append(seq, d)
			}
		}
		return seq, errors.Join(errs...)
	}
	return nil, fmt.Errorf("%s.type: %q is not supported", path, j.Type)
}

// post-processors: what EncodeSpecial adds around the encoded text.

type postProcessorJSON struct {
	Type          string            `json:"type"`
	Processors    []json.RawMessage `json:"processors"`
	Single        []json.RawMessage `json:"single"`
	SpecialTokens map[string]struct {
		IDs []int `json:"ids"`
	} `json:"special_tokens"`
	Cls []json.RawMessage `json:"cls"`
	Sep []json.RawMessage `json:"sep"`
}

// template is a post-processor's single-sequence template: the ids before
// and after the sequence.
type template struct{ before, after []int }

// parsePostProcessor reads the post-processor at path into the template
// for one sequence; null adds nothing.
func parsePostProcessor(raw []byte, path string) (template, error) {
	var tp template
	if isNull(raw) {
		return tp, nil
	}
	var j postProcessorJSON
	if err := json.Unmarshal(raw, &j); err != nil {
		return tp, fmt.Errorf("%s: %w", path, err)
	}
	switch j.Type {
	case "ByteLevel":
		return tp, nil
	case "TemplateProcessing":
		seen := false
		for i, item := range j.Single {
			var it struct {
				SpecialToken *struct{ ID string } `json:"SpecialToken"`
				Sequence     *struct{ ID string } `json:"Sequence"`
			}
			if err := json.Unmarshal(item, &it); err != nil {
				return tp, fmt.Errorf("%s.single[%d]: %w", path, i, err)
			}
			switch {
			case it.Sequence != nil && it.Sequence.ID == "A" && !seen:
				seen = true
			case it.SpecialToken != nil:
				st, ok := j.SpecialTokens[it.SpecialToken.ID]
				if !ok {
					return tp, fmt.Errorf("%s.single[%d]: special token %q is not in special_tokens", path, i, it.SpecialToken.ID)
				}
				if seen {
					tp.after = append(tp.after, st.IDs...)
				} else {
					tp.before = append(tp.before, st.IDs...)
				}
			default:
				return tp, fmt.Errorf("%s.single[%d]: want SpecialToken or Sequence A once, got %s", path, i, item)
			}
		}
		if !seen {
			return tp, fmt.Errorf("%s.single: has no Sequence A", path)
		}
		return tp, nil
	case "BertProcessing", "RobertaProcessing":
		cls, err1 := tokenPair(j.Cls)
		sep, err2 := tokenPair(j.Sep)
		if err := errors.Join(err1, err2); err != nil {
			return tp, fmt.Errorf("%s: %w", path, err)
		}
		return template{before: []int{cls}, after: []int{sep}}, nil
	case "Sequence":
		var errs []error
		for i, sub := range j.Processors {
			t, err := parsePostProcessor(sub, fmt.Sprintf("%s.processors[%d]", path, i))
			if err != nil {
				errs = append(errs, err)
				continue
			}
			tp.before = append(t.before, tp.before...)
			tp.after = append(tp.after, t.after...)
		}
		return tp, errors.Join(errs...)
	}
	return tp, fmt.Errorf("%s.type: %q is not supported", path, j.Type)
}

// tokenPair reads ["[CLS]", 101].
func tokenPair(raw []json.RawMessage) (int, error) {
	var id int
	if len(raw) != 2 || json.Unmarshal(raw[1], &id) != nil {
		return 0, errors.New("cls and sep must be [token, id]")
	}
	return id, nil
}
