package toolcall

import (
	"encoding/json"
	"strings"
)

// status is how far a piece of a family's syntax (a call's header, what
// follows its arguments) matched the text at hand.
type status uint8

const (
	stNeed status = iota // the text is a prefix of it: wait for more
	stFail               // the text is not it
	stOK                 // it matched
)

// scan matches a family's syntax against text that may still grow:
// reaching the end of the text while the syntax could still match sets
// need, so a caller can tell "not yet" from "no".
type scan struct {
	s    string
	i    int
	need bool
}

// ws skips white space.
func (c *scan) ws() {
	for c.i < len(c.s) && isSpace(c.s[c.i]) {
		c.i++
	}
	if c.i == len(c.s) {
		c.need = true
	}
}

// lit consumes l if the text goes on with it.
func (c *scan) lit(l string) bool {
	rest := c.s[c.i:]
	if strings.HasPrefix(rest, l) {
		c.i += len(l)
		c.need = false
		return true
	}
	c.need = strings.HasPrefix(l, rest)
	return false
}

// peek reports whether the next byte is b, consuming nothing.
func (c *scan) peek(b byte) bool {
	if c.i == len(c.s) {
		c.need = true
		return false
	}
	c.need = false
	return c.s[c.i] == b
}

// str consumes a JSON string and returns its value.
func (c *scan) str() (string, bool) {
	if !c.lit(`"`) {
		return "", false
	}
	start := c.i - 1
	for escaped := false; c.i < len(c.s); c.i++ {
		switch {
		case escaped:
			escaped = false
		case c.s[c.i] == '\\':
			escaped = true
		case c.s[c.i] == '"':
			c.i++
			var v string
			if json.Unmarshal([]byte(c.s[start:c.i]), &v) != nil {
				return "", false
			}
			return v, true
		}
	}
	c.need = true
	return "", false
}

// until consumes the text up to sep, and sep, returning the text; at most
// limit bytes of it.
func (c *scan) until(sep string, limit int) (string, bool) {
	rest := c.s[c.i:]
	i := strings.Index(rest, sep)
	if i < 0 || i > limit {
		c.need = len(rest) <= limit+len(sep)
		return "", false
	}
	c.i += i + len(sep)
	return rest[:i], true
}

// result is what a syntax function returns: stOK, else stNeed or stFail
// as the scan ended, with the length matched.
func (c *scan) result(ok bool) (status, int) {
	switch {
	case ok:
		return stOK, c.i
	case c.need:
		return stNeed, c.i
	}
	return stFail, c.i
}

// jsonEnd finds the end of the JSON object or array a text starts with
// (after white space), a piece at a time: only brackets and strings
// count, as a call is parsed whole once its end is found.
type jsonEnd struct {
	depth            int
	inString, escape bool
	n                int // bytes read
}

// read reads s and returns the length of it that ends the value, or -1
// while it is open. Anything but a bracket at the start ends it there,
// so that it fails to parse.
func (j *jsonEnd) read(s string) int {
	for i := 0; i < len(s); i++ {
		c := s[i]
		j.n++
		switch {
		case !j.inString && j.depth == 0 && c != '{' && c != '[' && !isSpace(c):
			return i + 1
		case j.inString:
			switch {
			case j.escape:
				j.escape = false
			case c == '\\':
				j.escape = true
			case c == '"':
				j.inString = false
			}
		case c == '"':
			j.inString = true
		case c == '{' || c == '[':
			j.depth++
		case c == '}' || c == ']':
			if j.depth--; j.depth == 0 {
				return i + 1
			}
		}
	}
	return -1
}
