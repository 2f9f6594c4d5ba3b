package tokenize

import (
	"fmt"
	"regexp"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Hugging Face compiles tokenizer.json's regular expressions with
// Oniguruma, whose classes are Unicode-aware and which has look-ahead; Go's
// regexp has ASCII \s, \d, \w and no look-ahead. pattern translates the
// classes and rewrites the one look-ahead idiom real tokenizers use,
// `\s+(?!\S)` followed by `\s+`, into a plain `\s+` whose match gives back
// its last character when a non-space follows: exactly what Oniguruma's
// backtracking does. Anything else it cannot express is refused.

// whiteSpace is Unicode's White_Space property, which is Oniguruma's (and
// Rust's) \s, as the inside of a character class.
const whiteSpace = `\t\n\v\f\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}`

// wordChars is Oniguruma's \w: letters, marks, decimal digits, connectors.
const wordChars = `\p{L}\p{M}\p{Nd}\p{Pc}`

// pattern finds the matches of a Split pre-tokenizer's or Replace's regex.
type pattern struct {
	re *regexp.Regexp
	// ws is the capture group of a rewritten `\s+(?!\S)` alternative, or 0.
	ws int
	// literal, when the pattern is a plain string, is matched with
	// strings.Index instead.
	literal string
	isLit   bool
	// find, when set, is a hand-written matcher.
	find func(s string, fn func(start, end int))
}

func literalPattern(s string) *pattern { return &pattern{literal: s, isLit: true} }

// compilePattern translates an Oniguruma pattern to Go.
func compilePattern(src string) (*pattern, error) {
	alts := topAlternatives(src)
	var b strings.Builder
	ws := false
	for i, alt := range alts {
		if i > 0 {
			b.WriteByte('|')
		}
		if alt == `\s+(?!\S)` {
			// The rewrite is exact only when the next alternative takes
			// the single space the look-ahead refuses.
			if i+1 >= len(alts) || alts[i+1] != `\s+` {
				return nil, fmt.Errorf("look-ahead %q is supported only when followed by |\\s+", alt)
			}
			b.WriteString(`(?P<ws>[` + whiteSpace + `]+)`)
			ws = true
			continue
		}
		t, err := translateRegex(alt)
		if err != nil {
			return nil, err
		}
		b.WriteString(t)
	}
	re, err := regexp.Compile(b.String())
	if err != nil {
		return nil, fmt.Errorf("regex %q: %w", src, err)
	}
	p := &pattern{re: re}
	if ws {
		p.ws = re.SubexpIndex("ws")
	}
	return p, nil
}

// topAlternatives splits a regex at its top-level |.
func topAlternatives(src string) []string {
	var alts []string
	depth, start, inClass := 0, 0, false
	for i := 0; i < len(src); i++ {
		switch c := src[i]; {
		case c == '\\':
			i++
		case inClass:
			if c == ']' {
				inClass = false
			}
		case c == '[':
			inClass = true
			if i+1 < len(src) && src[i+1] == '^' {
				i++
			}
			if i+1 < len(src) && src[i+1] == ']' {
				i++
			}
		case c == '(':
			depth++
		case c == ')':
			depth--
		case c == '|' && depth == 0:
			alts = append(alts, src[start:i])
			start = i + 1
		}
	}
	return append(alts, src[start:])
}

// translateRegex rewrites Oniguruma's Unicode-aware shorthand classes into
// Go's explicit ones and refuses look-around.
func translateRegex(src string) (string, error) {
	var b strings.Builder
	inClass := false
	for i := 0; i < len(src); i++ {
		c := src[i]
		switch {
		case c == '\\' && i+1 < len(src):
			e := src[i+1]
			i++
			var in, out string
			switch e {
			case 's':
				in, out = whiteSpace, "["+whiteSpace+"]"
			case 'S':
				out = "[^" + whiteSpace + "]"
			case 'd':
				in, out = `\p{Nd}`, `\p{Nd}`
			case 'D':
				out = `\P{Nd}`
			case 'w':
				in, out = wordChars, "["+wordChars+"]"
			case 'W':
				out = "[^" + wordChars + "]"
			case 'b', 'B', 'A', 'z', 'Z', 'G', 'h', 'H', 'R', 'X', 'K':
				return "", fmt.Errorf("regex %q: \\%c is not supported", src, e)
			default:
				b.WriteByte('\\')
				b.WriteByte(e)
				continue
			}
			if inClass {
				if in == "" {
					return "", fmt.Errorf("regex %q: \\%c inside a class is not supported", src, e)
				}
				b.WriteString(in)
			} else {
				b.WriteString(out)
			}
			continue
		case inClass:
			if c == ']' {
				inClass = false
			}
			if c == '[' {
				return "", fmt.Errorf("regex %q: nested classes are not supported", src)
			}
		case c == '[':
			inClass = true
			b.WriteByte(c)
			if i+1 < len(src) && src[i+1] == '^' {
				b.WriteByte('^')
				i++
			}
			if i+1 < len(src) && src[i+1] == ']' {
				b.WriteString(`\]`)
				i++
			}
			continue
		case c == '(' && i+2 < len(src) && src[i+1] == '?' && (src[i+2] == '=' || src[i+2] == '!' || src[i+2] == '<' || src[i+2] == '>'):
			return "", fmt.Errorf("regex %q: look-around and atomic groups are not supported", src)
		case c == '^' || c == '$':
			return "", fmt.Errorf("regex %q: anchors are not supported", src)
		}
		b.WriteByte(c)
	}
	return b.String(), nil
}

// matches calls fn for each match [start, end) in s, leftmost first, in
// order, without overlap.
func (p *pattern) matches(s string, fn func(start, end int)) {
	if p.find != nil {
		p.find(s, fn)
		return
	}
	if p.isLit {
		if p.literal == "" {
			return
		}
		for i := 0; ; {
			j := strings.Index(s[i:], p.literal)
			if j < 0 {
				return
			}
			fn(i+j, i+j+len(p.literal))
			i += j + len(p.literal)
		}
	}
	if p.ws == 0 {
		for _, m := range p.re.FindAllStringIndex(s, -1) {
			fn(m[0], m[1])
		}
		return
	}
	var loc []int
	for pos := 0; pos <= len(s); {
		loc = p.re.FindStringSubmatchIndex(s[pos:])
		if loc == nil {
			return
		}
		start, end := pos+loc[0], pos+loc[1]
		if loc[2*p.ws] >= 0 && end < len(s) {
			// A non-space follows: give back the last space, if the run
			// has more than one.
			_, last := utf8.DecodeLastRuneInString(s[start:end])
			if end-last > start {
				end -= last
			}
		}
		fn(start, end)
		if end == start {
			if end >= len(s) {
				return
			}
			_, n := utf8.DecodeRuneInString(s[end:])
			end += n
		}
		pos = end
	}
}

// isWhite is Unicode's White_Space, Rust's char::is_whitespace.
func isWhite(r rune) bool { return unicode.IsSpace(r) }
