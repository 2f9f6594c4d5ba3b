package tokenize

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

// byteAlphabet is GPT-2's reversible map from bytes to printable runes:
// printable Latin-1 bytes stand for themselves, the rest are shifted past
// 255 in order, so that no token string contains whitespace or controls.
var byteAlphabet = func() (m [256]rune) {
	n := 0
	for b := range 256 {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			m[b] = rune(b)
		} else {
			m[b] = rune(256 + n)
			n++
		}
	}
	return m
}()

// byteOfRune inverts byteAlphabet; -1 for runes outside it.
var byteOfRune = func() (m [324]int16) {
	for i := range m {
		m[i] = -1
	}
	for b, r := range byteAlphabet {
		m[r] = int16(b)
	}
	return m
}()

// appendByteLevel appends s spelled in the byte alphabet.
func appendByteLevel(dst []byte, s string) []byte {
	for i := range len(s) {
		dst = utf8.AppendRune(dst, byteAlphabet[s[i]])
	}
	return dst
}

// appendFromByteLevel appends the bytes a byte-level token stands for; a
// token with a character outside the alphabet (an added token) stands for
// itself, as in Hugging Face's ByteLevel decoder.
func appendFromByteLevel(dst []byte, tok string) []byte {
	start := len(dst)
	for _, r := range tok {
		if r < 0 || int(r) >= len(byteOfRune) || byteOfRune[r] < 0 {
			return append(dst[:start], tok...)
		}
		dst = append(dst, byte(byteOfRune[r]))
	}
	return dst
}

// splitWords splits text into pre-tokenization words by the GPT-2 rule,
// hand-written because Go's regexp lacks the look-ahead the rule needs:
//
//	's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//
// \s is unicode.IsSpace, \p{L} unicode.IsLetter, \p{N} unicode.IsNumber.
// Invalid UTF-8 bytes count as "other" characters. The words concatenate to
// text exactly.
func splitWords(text string) func(yield func(string) bool) {
	return func(yield func(string) bool) {
		for len(text) > 0 {
			n := wordLen(text)
			if !yield(text[:n]) {
				return
			}
			text = text[n:]
		}
	}
}

const (
	classSpace = iota
	classLetter
	classNumber
	classOther
)

func runeClass(r rune) int {
	switch {
	case unicode.IsSpace(r):
		return classSpace
	case unicode.IsLetter(r):
		return classLetter
	case unicode.IsNumber(r):
		return classNumber
	}
	return classOther
}

// wordLen is the length in bytes of the word that starts text.
func wordLen(text string) int {
	if text[0] == '\'' {
		for _, c := range [...]string{"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"} {
			if strings.HasPrefix(text, c) {
				return len(c)
			}
		}
	}
	r, size := utf8.DecodeRuneInString(text)
	class := runeClass(r)
	start := 0
	if r == ' ' && size < len(text) {
		next, nsize := utf8.DecodeRuneInString(text[size:])
		if c := runeClass(next); c != classSpace {
			class, start = c, size+nsize
		}
	}
	if class != classSpace {
		if start == 0 {
			start = size
		}
		return start + runLen(text[start:], class)
	}
	end := size + runLen(text[size:], classSpace)
	if end == len(text) || end == size {
		return end
	}
	// Whitespace before a non-space: leave its last rune to start the next
	// word, as \s+(?!\S) backtracks by one.
	_, last := utf8.DecodeLastRuneInString(text[:end])
	return end - last
}

// runLen is the length of the prefix of s whose runes are all of class.
func runLen(s string, class int) int {
	for i, r := range s {
		if runeClass(r) != class {
			return i
		}
	}
	return len(s)
}
