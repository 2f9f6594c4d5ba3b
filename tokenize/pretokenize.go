package tokenize

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// word is a piece of normalized text on its way to the model.
type word struct {
	s string
	// first: the piece starts the input text (Metaspace's "first").
	first bool
	// bytes: s is still raw bytes that a ByteLevel pre-tokenizer has
	// claimed; the model sees them in the byte alphabet. Mapping them
	// only when needed saves a copy of every word.
	bytes bool
}

// A preTokenizer splits each word into smaller words, appending them to out.
type preTokenizer interface {
	split(w word, out []word) []word
}

type splitBehavior int

const (
	removed splitBehavior = iota
	isolated
	mergedWithPrevious
	mergedWithNext
	contiguous
)

var behaviors = map[string]splitBehavior{
	"Removed": removed, "Isolated": isolated, "MergedWithPrevious": mergedWithPrevious,
	"MergedWithNext": mergedWithNext, "Contiguous": contiguous,
}

type segment struct {
	start, end int
	match      bool
}

// splitSegments applies a split behavior to the matches of find in w, as
// Hugging Face's NormalizedString::split does, and appends the non-empty
// pieces to out.
func splitSegments(w word, find func(s string, fn func(start, end int)), behavior splitBehavior, invert bool, out []word) []word {
	s := w.s
	var segs []segment
	prev := 0
	find(s, func(start, end int) {
		if prev < start {
			segs = append(segs, segment{prev, start, invert})
		}
		segs = append(segs, segment{start, end, !invert})
		prev = end
	})
	if prev < len(s) {
		segs = append(segs, segment{prev, len(s), invert})
	}
	var kept []segment
	switch behavior {
	case isolated:
		kept = segs
	case removed:
		for _, g := range segs {
			if !g.match {
				kept = append(kept, g)
			}
		}
	case contiguous:
		prevMatch := false
		for _, g := range segs {
			if g.match == prevMatch && len(kept) > 0 {
				kept[len(kept)-1].end = g.end
			} else {
				kept = append(kept, g)
			}
			prevMatch = g.match
		}
	case mergedWithPrevious:
		prevMatch := false
		for _, g := range segs {
			if g.match && !prevMatch && len(kept) > 0 {
				kept[len(kept)-1].end = g.end
			} else {
				kept = append(kept, g)
			}
			prevMatch = g.match
		}
	case mergedWithNext:
		prevMatch := false
		for i := len(segs) - 1; i >= 0; i-- {
			g := segs[i]
			if g.match && !prevMatch && len(kept) > 0 {
				kept[len(kept)-1].start = g.start
			} else {
				kept = append(kept, g)
			}
			prevMatch = g.match
		}
		for i, j := 0, len(kept)-1; i < j; i, j = i+1, j-1 {
			kept[i], kept[j] = kept[j], kept[i]
		}
	}
	for _, g := range kept {
		if g.end > g.start {
			out = append(out, word{s: s[g.start:g.end], first: w.first && g.start == 0, bytes: w.bytes})
		}
	}
	return out
}

// charMatches makes every character for which is returns true a match of
// its own, as Hugging Face's character-predicate patterns do.
func charMatches(is func(rune) bool) func(s string, fn func(start, end int)) {
	return func(s string, fn func(start, end int)) {
		for i, r := range s {
			if is(r) {
				fn(i, i+utf8.RuneLen(r))
			}
		}
	}
}

type (
	splitPre struct {
		p        *pattern
		behavior splitBehavior
		invert   bool
	}
	charSplit struct {
		is       func(rune) bool
		behavior splitBehavior
	}
	byteLevelPre struct{ prefixSpace, regex bool }
	metaspacePre struct {
		rep        string
		prependAll bool // "always"; otherwise first or never
		prependFst bool // "first"
		splitRep   bool
	}
	preSeq []preTokenizer
)

func (p splitPre) split(w word, out []word) []word {
	w = materialize(w)
	return splitSegments(w, p.p.matches, p.behavior, p.invert, out)
}

func (c charSplit) split(w word, out []word) []word {
	w = materialize(w)
	return splitSegments(w, charMatches(c.is), c.behavior, false, out)
}

func (b byteLevelPre) split(w word, out []word) []word {
	w = materialize(w)
	if b.prefixSpace && !strings.HasPrefix(w.s, " ") {
		w.s = " " + w.s
	}
	w.bytes = true
	if !b.regex {
		return append(out, w)
	}
	for len(w.s) > 0 {
		n := wordLen(w.s)
		out = append(out, word{s: w.s[:n], first: w.first, bytes: true})
		w.s, w.first = w.s[n:], false
	}
	return out
}

func (m metaspacePre) split(w word, out []word) []word {
	w = materialize(w)
	w.s = strings.ReplaceAll(w.s, " ", m.rep)
	if (m.prependAll || (m.prependFst && w.first)) && !strings.HasPrefix(w.s, m.rep) {
		w.s = m.rep + w.s
	}
	if !m.splitRep {
		return append(out, w)
	}
	return splitSegments(w, literalPattern(m.rep).matches, mergedWithNext, false, out)
}

func (q preSeq) split(w word, out []word) []word {
	cur := []word{w}
	for _, p := range q {
		var next []word
		for _, c := range cur {
			next = p.split(c, next)
		}
		cur = next
	}
	return append(out, cur...)
}

// materialize maps a byte-level word into the byte alphabet, for the rare
// pre-tokenizer that follows ByteLevel.
func materialize(w word) word {
	if w.bytes {
		w.s, w.bytes = string(appendByteLevel(nil, w.s)), false
	}
	return w
}

// whitespacePre is Hugging Face's Whitespace: runs of word characters and
// runs of other non-space characters; spaces are dropped.
func whitespaceMatches(s string, fn func(start, end int)) {
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if isWhite(r) {
			i += n
			continue
		}
		w := isWordChar(r)
		j := i + n
		for j < len(s) {
			r2, n2 := utf8.DecodeRuneInString(s[j:])
			if isWhite(r2) || isWordChar(r2) != w {
				break
			}
			j += n2
		}
		fn(i, j)
		i = j
	}
}

func isWordChar(r rune) bool {
	return unicode.In(r, unicode.L, unicode.M, unicode.Nd, unicode.Pc, unicode.Nl, unicode.Other_Alphabetic, unicode.Join_Control)
}

func isPunct(r rune) bool {
	return unicode.IsPunct(r) || (r < 0x80 && unicode.IsSymbol(r))
}

type preTokenizerJSON struct {
	Type             string            `json:"type"`
	Pretokenizers    []json.RawMessage `json:"pretokenizers"`
	Pattern          *patternJSON      `json:"pattern"`
	Behavior         string            `json:"behavior"`
	Invert           bool              `json:"invert"`
	AddPrefixSpace   *bool             `json:"add_prefix_space"`
	UseRegex         *bool             `json:"use_regex"`
	Replacement      *string           `json:"replacement"`
	PrependScheme    *string           `json:"prepend_scheme"`
	Split            *bool             `json:"split"`
	IndividualDigits bool              `json:"individual_digits"`
	Delimiter        string            `json:"delimiter"`
}

func (j *preTokenizerJSON) behavior(path string, def splitBehavior) (splitBehavior, error) {
	if j.Behavior == "" {
		return def, nil
	}
	b, ok := behaviors[j.Behavior]
	if !ok {
		return 0, fmt.Errorf("%s.behavior: %q is not supported", path, j.Behavior)
	}
	return b, nil
}

// parsePreTokenizer reads the pre-tokenizer at path; null is none.
func parsePreTokenizer(raw []byte, path string) (preTokenizer, error) {
	if isNull(raw) {
		return nil, nil
	}
	var j preTokenizerJSON
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	switch j.Type {
	case "ByteLevel":
		return byteLevelPre{
			prefixSpace: j.AddPrefixSpace == nil || *j.AddPrefixSpace,
			regex:       j.UseRegex == nil || *j.UseRegex,
		}, nil
	case "Split":
		p, err := j.Pattern.compile(path)
		if err != nil {
			return nil, err
		}
		if j.Behavior == "" {
			return nil, fmt.Errorf("%s.behavior: missing", path)
		}
		b, err := j.behavior(path, removed)
		if err != nil {
			return nil, err
		}
		return splitPre{p, b, j.Invert}, nil
	case "Metaspace":
		m, err := metaspaceConfig(&j, path)
		if err != nil {
			return nil, err
		}
		return m, nil
	case "Digits":
		b := contiguous
		if j.IndividualDigits {
			b = isolated
		}
		return charSplit{unicode.IsNumber, b}, nil
	case "Punctuation":
		b, err := j.behavior(path, isolated)
		if err != nil {
			return nil, err
		}
		return charSplit{isPunct, b}, nil
	case "Whitespace":
		return splitPre{&pattern{find: whitespaceMatches}, removed, true}, nil
	case "WhitespaceSplit":
		return charSplit{isWhite, removed}, nil
	case "CharDelimiterSplit":
		r, n := utf8.DecodeRuneInString(j.Delimiter)
		if n == 0 || n != len(j.Delimiter) {
			return nil, fmt.Errorf("%s.delimiter: want one character, got %q", path, j.Delimiter)
		}
		return charSplit{func(c rune) bool { return c == r }, removed}, nil
	case "BertPreTokenizer":
		return preSeq{charSplit{isWhite, removed}, charSplit{isPunct, isolated}}, nil
	case "Sequence":
		var seq preSeq
		var errs []error
		for i, sub := range j.Pretokenizers {
			p, err := parsePreTokenizer(sub, fmt.Sprintf("%s.pretokenizers[%d]", path, i))
			if err != nil {
				errs = append(errs, err)
			} else if p != nil {
				seq = append(seq, p)
			}
		}
		return seq, errors.Join(errs...)
	}
	return nil, fmt.Errorf("%s.type: %q is not supported", path, j.Type)
}

func metaspaceConfig(j *preTokenizerJSON, path string) (metaspacePre, error) {
	m := metaspacePre{rep: "▁", splitRep: j.Split == nil || *j.Split}
	if j.Replacement != nil {
		if utf8.RuneCountInString(*j.Replacement) != 1 {
			return m, fmt.Errorf("%s.replacement: want one character, got %q", path, *j.Replacement)
		}
		m.rep = *j.Replacement
	}
	scheme := "always"
	if j.PrependScheme != nil {
		scheme = *j.PrependScheme
	} else if j.AddPrefixSpace != nil && !*j.AddPrefixSpace {
		scheme = "never"
	}
	switch scheme {
	case "always":
		m.prependAll = true
	case "first":
		m.prependFst = true
	case "never":
	default:
		return m, fmt.Errorf("%s.prepend_scheme: %q is not supported", path, scheme)
	}
	return m, nil
}
