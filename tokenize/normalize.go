package tokenize

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode"

	"golang.org/x/text/unicode/norm"
)

// A normalizer rewrites text before it is split into words: Unicode
// normalization forms, lowercasing, replacing and prepending.
type normalizer interface {
	normalize(s string) string
}

type (
	normForm    struct{ f norm.Form }
	lowercase   struct{}
	stripAccent struct{}
	prepend     struct{ s string }
	replace     struct {
		p    *pattern
		with string
	}
	strip         struct{ left, right bool }
	normalizerSeq []normalizer
)

func (n normForm) normalize(s string) string {
	if n.f.IsNormalString(s) {
		return s
	}
	return n.f.String(s)
}

// normalize lowercases one character at a time, as Rust's char::to_lowercase
// does: İ becomes i and a combining dot, and there is no final-sigma rule.
func (lowercase) normalize(s string) string {
	return strings.Map(unicode.ToLower, strings.ReplaceAll(s, "İ", "i\u0307"))
}

func (stripAccent) normalize(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.Is(unicode.Mn, r) {
			return -1
		}
		return r
	}, s)
}

func (p prepend) normalize(s string) string {
	if s == "" {
		return s
	}
	return p.s + s
}

func (r replace) normalize(s string) string { return r.p.replaceAll(s, r.with) }

func (st strip) normalize(s string) string {
	if st.left {
		s = strings.TrimLeftFunc(s, isWhite)
	}
	if st.right {
		s = strings.TrimRightFunc(s, isWhite)
	}
	return s
}

func (q normalizerSeq) normalize(s string) string {
	for _, n := range q {
		s = n.normalize(s)
	}
	return s
}

// replaceAll replaces every match of p in s.
func (p *pattern) replaceAll(s, with string) string {
	if p.isLit {
		if p.literal == "" {
			return s
		}
		return strings.ReplaceAll(s, p.literal, with)
	}
	var b strings.Builder
	last := 0
	p.matches(s, func(start, end int) {
		b.WriteString(s[last:start])
		b.WriteString(with)
		last = end
	})
	if last == 0 && b.Len() == 0 {
		return s
	}
	b.WriteString(s[last:])
	return b.String()
}

// patternJSON is the {"String": ...} or {"Regex": ...} of Split and Replace.
type patternJSON struct {
	String *string `json:"String"`
	Regex  *string `json:"Regex"`
}

func (pj *patternJSON) compile(path string) (*pattern, error) {
	switch {
	case pj == nil:
		return nil, fmt.Errorf("%s.pattern: missing", path)
	case pj.String != nil:
		return literalPattern(*pj.String), nil
	case pj.Regex != nil:
		p, err := compilePattern(*pj.Regex)
		if err != nil {
			return nil, fmt.Errorf("%s.pattern: %w", path, err)
		}
		return p, nil
	}
	return nil, fmt.Errorf("%s.pattern: want String or Regex", path)
}

type normalizerJSON struct {
	Type        string            `json:"type"`
	Normalizers []json.RawMessage `json:"normalizers"`
	Prepend     string            `json:"prepend"`
	Pattern     *patternJSON      `json:"pattern"`
	Content     string            `json:"content"`
	StripLeft   bool              `json:"strip_left"`
	StripRight  bool              `json:"strip_right"`
}

// parseNormalizer reads the normalizer at path; null is no normalizer.
func parseNormalizer(raw []byte, path string) (normalizer, error) {
	if isNull(raw) {
		return nil, nil
	}
	var j normalizerJSON
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	switch j.Type {
	case "NFC":
		return normForm{norm.NFC}, nil
	case "NFD":
		return normForm{norm.NFD}, nil
	case "NFKC":
		return normForm{norm.NFKC}, nil
	case "NFKD":
		return normForm{norm.NFKD}, nil
	case "Lowercase":
		return lowercase{}, nil
	case "StripAccents":
		return stripAccent{}, nil
	case "Prepend":
		return prepend{j.Prepend}, nil
	case "Strip":
		return strip{j.StripLeft, j.StripRight}, nil
	case "Replace":
		p, err := j.Pattern.compile(path)
		if err != nil {
			return nil, err
		}
		return replace{p, j.Content}, nil
	case "Sequence":
		var seq normalizerSeq
		var errs []error
		for i, sub := range j.Normalizers {
			n, err := parseNormalizer(sub, fmt.Sprintf("%s.normalizers[%d]", path, i))
			if err != nil {
				errs = append(errs, err)
			} else if n != nil {
				seq = append(seq, n)
			}
		}
		return seq, errors.Join(errs...)
	}
	return nil, fmt.Errorf("%s.type: %q is not supported", path, j.Type)
}

func isNull(raw []byte) bool {
	s := strings.TrimSpace(string(raw))
	return s == "" || s == "null"
}
