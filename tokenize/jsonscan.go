package tokenize

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"
)

// A real tokenizer.json is tens of megabytes, nearly all of it the
// vocabulary and the merges. encoding/json decodes those into maps and
// slices at a few tens of MB/s, so this file reads them directly: objectFields
// cuts an object into its members without decoding them, and readVocab and
// readMerges decode the two big members. Everything small goes through
// encoding/json as usual.

// jsonReader reads JSON text from a byte slice. The first error stops it.
type jsonReader struct {
	data []byte
	pos  int
	buf  []byte // scratch for unescaped strings
}

func (r *jsonReader) fail(format string, args ...any) error {
	return fmt.Errorf("offset %d: %s", r.pos, fmt.Sprintf(format, args...))
}

func (r *jsonReader) skipSpace() {
	for r.pos < len(r.data) {
		switch r.data[r.pos] {
		case ' ', '\t', '\n', '\r':
			r.pos++
		default:
			return
		}
	}
}

// expect consumes c after optional whitespace.
func (r *jsonReader) expect(c byte) error {
	r.skipSpace()
	if r.pos >= len(r.data) || r.data[r.pos] != c {
		return r.fail("want %q", c)
	}
	r.pos++
	return nil
}

// peek returns the next non-space byte, or 0 at the end.
func (r *jsonReader) peek() byte {
	r.skipSpace()
	if r.pos >= len(r.data) {
		return 0
	}
	return r.data[r.pos]
}

// str reads a JSON string and returns its unescaped bytes, which stay
// valid only until the next call.
func (r *jsonReader) str() ([]byte, error) {
	if err := r.expect('"'); err != nil {
		return nil, err
	}
	// bytes.IndexByte is vectorized; tokenizer.json is mostly strings.
	start := r.pos
	q := bytes.IndexByte(r.data[start:], '"')
	if q < 0 {
		return nil, r.fail("unterminated string")
	}
	s := r.data[start : start+q]
	if bs := bytes.IndexByte(s, '\\'); bs >= 0 {
		r.pos = start + bs
		r.buf = append(r.buf[:0], r.data[start:r.pos]...)
		return r.escapedStr()
	}
	if hasControl(s) {
		return nil, r.fail("control character in string")
	}
	r.pos = start + q + 1
	return s, nil
}

func hasControl(s []byte) bool {
	for _, c := range s {
		if c < 0x20 {
			return true
		}
	}
	return false
}

func (r *jsonReader) escapedStr() ([]byte, error) {
	for r.pos < len(r.data) {
		c := r.data[r.pos]
		switch {
		case c == '"':
			r.pos++
			return r.buf, nil
		case c < 0x20:
			return nil, r.fail("control character in string")
		case c != '\\':
			r.buf = append(r.buf, c)
			r.pos++
			continue
		}
		if r.pos+1 >= len(r.data) {
			break
		}
		e := r.data[r.pos+1]
		r.pos += 2
		switch e {
		case '"', '\\', '/':
			r.buf = append(r.buf, e)
		case 'b':
			r.buf = append(r.buf, '\b')
		case 'f':
			r.buf = append(r.buf, '\f')
		case 'n':
			r.buf = append(r.buf, '\n')
		case 'r':
			r.buf = append(r.buf, '\r')
		case 't':
			r.buf = append(r.buf, '\t')
		case 'u':
			c1, ok := r.hex4()
			if !ok {
				return nil, r.fail("bad \\u escape")
			}
			ch := rune(c1)
			if utf16.IsSurrogate(ch) {
				// A pair decodes to one character; a lone half is
				// replaced, as encoding/json does.
				ch = utf8.RuneError
				if r.pos+1 < len(r.data) && r.data[r.pos] == '\\' && r.data[r.pos+1] == 'u' {
					save := r.pos
					r.pos += 2
					if c2, ok := r.hex4(); ok {
						if d := utf16.DecodeRune(rune(c1), rune(c2)); d != utf8.RuneError {
							ch = d
						} else {
							r.pos = save
						}
					} else {
						r.pos = save
					}
				}
			}
			r.buf = utf8.AppendRune(r.buf, ch)
		default:
			return nil, r.fail("bad escape \\%c", e)
		}
	}
	return nil, r.fail("unterminated string")
}

func (r *jsonReader) hex4() (uint16, bool) {
	if r.pos+4 > len(r.data) {
		return 0, false
	}
	v, err := strconv.ParseUint(string(r.data[r.pos:r.pos+4]), 16, 16)
	if err != nil {
		return 0, false
	}
	r.pos += 4
	return uint16(v), true
}

// integer reads a non-negative JSON integer that fits an int32.
func (r *jsonReader) integer() (int, error) {
	r.skipSpace()
	start := r.pos
	n := 0
	for r.pos < len(r.data) && r.data[r.pos] >= '0' && r.data[r.pos] <= '9' {
		n = n*10 + int(r.data[r.pos]-'0')
		r.pos++
		if n > 1<<31-1 {
			return 0, r.fail("integer too large")
		}
	}
	if r.pos == start {
		return 0, r.fail("want a non-negative integer")
	}
	if r.pos < len(r.data) {
		switch r.data[r.pos] {
		case '.', 'e', 'E':
			return 0, r.fail("want an integer")
		}
	}
	return n, nil
}

// skipValue passes over one JSON value of any kind, checking its syntax.
func (r *jsonReader) skipValue(depth int) error {
	if depth > 200 {
		return r.fail("nested too deeply")
	}
	switch c := r.peek(); c {
	case '"':
		_, err := r.str()
		return err
	case '{':
		r.pos++
		if r.peek() == '}' {
			r.pos++
			return nil
		}
		for {
			if _, err := r.str(); err != nil {
				return err
			}
			if err := r.expect(':'); err != nil {
				return err
			}
			if err := r.skipValue(depth + 1); err != nil {
				return err
			}
			if r.peek() == ',' {
				r.pos++
				continue
			}
			return r.expect('}')
		}
	case '[':
		r.pos++
		if r.peek() == ']' {
			r.pos++
			return nil
		}
		for {
			if err := r.skipValue(depth + 1); err != nil {
				return err
			}
			if r.peek() == ',' {
				r.pos++
				continue
			}
			return r.expect(']')
		}
	case 't', 'f', 'n':
		for _, lit := range []string{"true", "false", "null"} {
			if len(r.data)-r.pos >= len(lit) && string(r.data[r.pos:r.pos+len(lit)]) == lit {
				r.pos += len(lit)
				return nil
			}
		}
		return r.fail("bad literal")
	default:
		start := r.pos
		for r.pos < len(r.data) {
			c := r.data[r.pos]
			if (c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E' {
				r.pos++
				continue
			}
			break
		}
		if r.pos == start {
			return r.fail("want a value")
		}
		if _, err := strconv.ParseFloat(string(r.data[start:r.pos]), 64); err != nil {
			return r.fail("bad number")
		}
		return nil
	}
}

// objectFields splits a JSON object into its members' raw values. A later
// duplicate key wins, as in encoding/json.
func objectFields(data []byte) (map[string][]byte, error) {
	r := &jsonReader{data: data}
	fields := map[string][]byte{}
	if err := r.expect('{'); err != nil {
		return nil, err
	}
	if r.peek() == '}' {
		r.pos++
	} else {
		for {
			k, err := r.str()
			if err != nil {
				return nil, err
			}
			key := string(k)
			if err := r.expect(':'); err != nil {
				return nil, err
			}
			r.skipSpace()
			start := r.pos
			if err := r.skipValue(0); err != nil {
				return nil, err
			}
			fields[key] = data[start:r.pos]
			if r.peek() == ',' {
				r.pos++
				continue
			}
			if err := r.expect('}'); err != nil {
				return nil, err
			}
			break
		}
	}
	if r.skipSpace(); r.pos != len(data) {
		return nil, r.fail("data after the object")
	}
	return fields, nil
}

// readVocab decodes {"token": id, ...}.
func readVocab(data []byte) (map[string]int, error) {
	r := &jsonReader{data: data}
	if err := r.expect('{'); err != nil {
		return nil, err
	}
	vocab := make(map[string]int, len(data)/32)
	if r.peek() == '}' {
		r.pos++
		return vocab, nil
	}
	for {
		k, err := r.str()
		if err != nil {
			return nil, err
		}
		key := string(k)
		if err := r.expect(':'); err != nil {
			return nil, err
		}
		id, err := r.integer()
		if err != nil {
			return nil, fmt.Errorf("token %q: %w", key, err)
		}
		vocab[key] = id
		if r.peek() == ',' {
			r.pos++
			continue
		}
		return vocab, r.expect('}')
	}
}

// readMerges decodes the merges in either spelling, "a b" or ["a", "b"],
// calling add for each with its index. The strings passed to add are valid
// only during the call.
func readMerges(data []byte, add func(i int, a, b []byte) error) error {
	r := &jsonReader{data: data}
	if err := r.expect('['); err != nil {
		return err
	}
	if r.peek() == ']' {
		r.pos++
		return nil
	}
	var left []byte
	for i := 0; ; i++ {
		var a, b []byte
		switch r.peek() {
		case '"':
			s, err := r.str()
			if err != nil {
				return err
			}
			sp := -1
			for j, c := range s {
				if c == ' ' {
					if sp >= 0 {
						sp = -2
						break
					}
					sp = j
				}
			}
			if sp <= 0 || sp == len(s)-1 {
				return fmt.Errorf("[%d]: want \"left right\", got %q", i, s)
			}
			a, b = s[:sp], s[sp+1:]
		case '[':
			r.pos++
			s, err := r.str()
			if err != nil {
				return fmt.Errorf("[%d]: %w", i, err)
			}
			left = append(left[:0], s...)
			if err := r.expect(','); err != nil {
				return fmt.Errorf("[%d]: want a pair of strings: %w", i, err)
			}
			if b, err = r.str(); err != nil {
				return fmt.Errorf("[%d]: %w", i, err)
			}
			if err := r.expect(']'); err != nil {
				return fmt.Errorf("[%d]: want a pair of strings: %w", i, err)
			}
			a = left
			if len(a) == 0 || len(b) == 0 {
				return fmt.Errorf("[%d]: empty side in [%q, %q]", i, a, b)
			}
		default:
			return fmt.Errorf("[%d]: %w", i, r.fail("want a string or a pair of strings"))
		}
		if err := add(i, a, b); err != nil {
			return err
		}
		if r.peek() == ',' {
			r.pos++
			continue
		}
		return r.expect(']')
	}
}

var errNotObject = errors.New("want a JSON object")
