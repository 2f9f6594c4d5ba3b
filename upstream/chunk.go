package upstream

import (
	"bytes"
	"encoding/json"
	"errors"
	"strconv"
	"unicode/utf8"
)

// chunk is one event of an OpenAI-style completion stream: the few fields
// the gateway reads of it.
type chunk struct {
	Choices []choice        `json:"choices"`
	Usage   *usage          `json:"usage"`
	Error   json.RawMessage `json:"error"`
}

type choice struct {
	Index uint32 `json:"index"`
	Text  string `json:"text"`
	Delta struct {
		Content string `json:"content"`
		// ToolCalls is kept as the server wrote it, for callReader.
		ToolCalls json.RawMessage `json:"tool_calls"`
	} `json:"delta"`
	FinishReason string `json:"finish_reason"`
	// Logprobs is kept as the server wrote it: only a request that asked
	// for logprobs reads it (chunkLogprobs).
	Logprobs json.RawMessage `json:"logprobs"`
}

type usage struct {
	PromptTokens     uint32 `json:"prompt_tokens"`
	CompletionTokens uint32 `json:"completion_tokens"`
}

// decodeChunk reads one event's JSON into ch. Every token of an upstream
// stream arrives as one such event, and encoding/json spent a third of an
// edge gateway's CPU on them (docs/BENCHMARKS.md, "An edge in front of a
// regional tier"): it checks the whole document, then walks it again by
// reflection. fastChunk reads the shapes servers send in one pass; for
// anything it does not handle exactly as encoding/json would (an escape
// it cannot take as is, a duplicate or differently cased key, a value of
// an unexpected type, malformed JSON) it gives up and encoding/json
// decides, errors included. FuzzDecodeChunk holds the two to the same
// answers.
func decodeChunk(data []byte, ch *chunk) error {
	*ch = chunk{}
	if fastChunk(data, ch) {
		return nil
	}
	*ch = chunk{}
	return json.Unmarshal(data, ch)
}

// errSlow is fastChunk's signal to hand the document to encoding/json.
var errSlow = errors.New("not on the fast path")

// scan is a cursor over one JSON document.
type scan struct {
	b     []byte
	i     int
	depth int // objects and arrays open
}

// maxDepth bounds nesting, as encoding/json's own limit does: past it the
// document goes the slow way, which refuses it.
const maxDepth = 10000

func fastChunk(data []byte, ch *chunk) bool {
	s := &scan{b: data}
	if err := s.chunk(ch); err != nil {
		return false
	}
	s.space()
	return s.i == len(s.b)
}

func (s *scan) space() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// peek returns the next byte after white space, or 0 at the end.
func (s *scan) peek() byte {
	s.space()
	if s.i == len(s.b) {
		return 0
	}
	return s.b[s.i]
}

func (s *scan) expect(c byte) error {
	if s.peek() != c {
		return errSlow
	}
	s.i++
	return nil
}

// literal consumes word (null, true, false) at the cursor.
func (s *scan) literal(word string) error {
	s.space()
	if !bytes.HasPrefix(s.b[s.i:], []byte(word)) {
		return errSlow
	}
	s.i += len(word)
	return nil
}

// null consumes a null if one is next and reports whether it did.
func (s *scan) null() bool {
	if s.peek() == 'n' && s.literal("null") == nil {
		return true
	}
	return false
}

// rawString returns the bytes of the string at the cursor, without its
// quotes, and whether it holds an escape. It refuses control characters
// and invalid UTF-8, which encoding/json would take differently.
func (s *scan) rawString() ([]byte, bool, error) {
	if err := s.expect('"'); err != nil {
		return nil, false, err
	}
	start, escaped := s.i, false
	for s.i < len(s.b) {
		c := s.b[s.i]
		switch {
		case c == '"':
			raw := s.b[start:s.i]
			s.i++
			if !utf8.Valid(raw) {
				return nil, false, errSlow
			}
			return raw, escaped, nil
		case c == '\\':
			escaped = true
			if !s.escape() {
				return nil, false, errSlow
			}
		case c < 0x20:
			return nil, false, errSlow
		default:
			s.i++
		}
	}
	return nil, false, errSlow
}

// escape passes over one escape sequence at the cursor, its backslash
// included, and reports whether it is one JSON allows.
func (s *scan) escape() bool {
	if s.i+1 >= len(s.b) {
		return false
	}
	switch s.b[s.i+1] {
	case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
		s.i += 2
		return true
	case 'u':
		if s.i+6 > len(s.b) {
			return false
		}
		for _, h := range s.b[s.i+2 : s.i+6] {
			if !('0' <= h && h <= '9' || 'a' <= h && h <= 'f' || 'A' <= h && h <= 'F') {
				return false
			}
		}
		s.i += 6
		return true
	}
	return false
}

// str reads a string value: null leaves *dst as it is, as encoding/json
// does.
func (s *scan) str(dst *string) error {
	if s.null() {
		return nil
	}
	start := s.i
	raw, escaped, err := s.rawString()
	if err != nil {
		return err
	}
	if !escaped {
		*dst = string(raw)
		return nil
	}
	// Escapes are rare (a newline token): encoding/json reads this one
	// string.
	return json.Unmarshal(s.b[start:s.i], dst)
}

// key reads an object key and the colon after it. Escaped keys go the
// slow way.
func (s *scan) key() ([]byte, error) {
	raw, escaped, err := s.rawString()
	if err != nil || escaped {
		return nil, errSlow
	}
	return raw, s.expect(':')
}

// object calls field for each key of the object at the cursor. A key the
// object already had, or a key that matches one of names only when case
// is ignored (encoding/json would take it), is left to encoding/json.
func (s *scan) object(names []string, field func(key []byte) error) error {
	if err := s.expect('{'); err != nil {
		return err
	}
	if s.depth++; s.depth > maxDepth {
		return errSlow
	}
	defer func() { s.depth-- }()
	var seen uint64
	if s.peek() == '}' {
		s.i++
		return nil
	}
	for {
		k, err := s.key()
		if err != nil {
			return err
		}
		for i, n := range names {
			if string(k) == n {
				if seen&(1<<i) != 0 {
					return errSlow
				}
				seen |= 1 << i
			} else if bytes.EqualFold(k, []byte(n)) {
				// encoding/json matches keys this way (Unicode simple
				// folding: a Kelvin sign is a k).
				return errSlow
			}
		}
		if err := field(k); err != nil {
			return err
		}
		switch s.peek() {
		case ',':
			s.i++
		case '}':
			s.i++
			return nil
		default:
			return errSlow
		}
	}
}

// skip passes over one value of any type, checking its form only as far
// as finding its end needs.
func (s *scan) skip() error {
	switch s.peek() {
	case '"':
		_, _, err := s.rawString()
		return err
	case '{':
		return s.object(nil, func([]byte) error { return s.skip() })
	case '[':
		return s.array(func() error { return s.skip() })
	case 'n':
		return s.literal("null")
	case 't':
		return s.literal("true")
	case 'f':
		return s.literal("false")
	case '-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9':
		_, err := s.number()
		return err
	}
	return errSlow
}

// number returns the bytes of a number in JSON's grammar.
func (s *scan) number() ([]byte, error) {
	start := s.i
	if s.i < len(s.b) && s.b[s.i] == '-' {
		s.i++
	}
	digits := func() int {
		n := 0
		for s.i < len(s.b) && s.b[s.i] >= '0' && s.b[s.i] <= '9' {
			s.i++
			n++
		}
		return n
	}
	switch n := digits(); {
	case n == 0:
		return nil, errSlow
	case n > 1 && s.b[s.i-n] == '0':
		return nil, errSlow // a leading zero
	}
	if s.i < len(s.b) && s.b[s.i] == '.' {
		s.i++
		if digits() == 0 {
			return nil, errSlow
		}
	}
	if s.i < len(s.b) && (s.b[s.i] == 'e' || s.b[s.i] == 'E') {
		s.i++
		if s.i < len(s.b) && (s.b[s.i] == '+' || s.b[s.i] == '-') {
			s.i++
		}
		if digits() == 0 {
			return nil, errSlow
		}
	}
	return s.b[start:s.i], nil
}

func (s *scan) array(elem func() error) error {
	if err := s.expect('['); err != nil {
		return err
	}
	if s.depth++; s.depth > maxDepth {
		return errSlow
	}
	defer func() { s.depth-- }()
	if s.peek() == ']' {
		s.i++
		return nil
	}
	for {
		if err := elem(); err != nil {
			return err
		}
		switch s.peek() {
		case ',':
			s.i++
		case ']':
			s.i++
			return nil
		default:
			return errSlow
		}
	}
}

// raw returns a copy of the value at the cursor as it is written, as
// encoding/json fills a json.RawMessage (null included).
func (s *scan) raw() (json.RawMessage, error) {
	s.space()
	start := s.i
	if err := s.skip(); err != nil {
		return nil, err
	}
	return append(json.RawMessage(nil), s.b[start:s.i]...), nil
}

func (s *scan) uint32(dst *uint32) error {
	if s.null() {
		return nil
	}
	s.space()
	raw, err := s.number()
	if err != nil {
		return err
	}
	n, err := strconv.ParseUint(string(raw), 10, 32)
	if err != nil {
		return errSlow // a fraction, a sign or out of range: encoding/json says what
	}
	*dst = uint32(n)
	return nil
}

var (
	chunkKeys  = []string{"choices", "usage", "error"}
	choiceKeys = []string{"text", "delta", "finish_reason", "logprobs", "index"}
	deltaKeys  = []string{"content", "tool_calls"}
	usageKeys  = []string{"prompt_tokens", "completion_tokens"}
)

func (s *scan) chunk(ch *chunk) error {
	return s.object(chunkKeys, func(k []byte) error {
		switch string(k) {
		case "choices":
			if s.null() {
				return nil
			}
			ch.Choices = ch.Choices[:0]
			return s.array(func() error {
				ch.Choices = append(ch.Choices, choice{})
				return s.choice(&ch.Choices[len(ch.Choices)-1])
			})
		case "usage":
			if s.null() {
				return nil
			}
			ch.Usage = &usage{}
			return s.object(usageKeys, func(k []byte) error {
				switch string(k) {
				case "prompt_tokens":
					return s.uint32(&ch.Usage.PromptTokens)
				case "completion_tokens":
					return s.uint32(&ch.Usage.CompletionTokens)
				}
				return s.skip()
			})
		case "error":
			raw, err := s.raw()
			ch.Error = raw
			return err
		}
		return s.skip()
	})
}

func (s *scan) choice(c *choice) error {
	if s.null() {
		return nil
	}
	return s.object(choiceKeys, func(k []byte) error {
		switch string(k) {
		case "text":
			return s.str(&c.Text)
		case "finish_reason":
			return s.str(&c.FinishReason)
		case "index":
			return s.uint32(&c.Index)
		case "logprobs":
			raw, err := s.raw()
			c.Logprobs = raw
			return err
		case "delta":
			if s.null() {
				return nil
			}
			return s.object(deltaKeys, func(k []byte) error {
				switch string(k) {
				case "content":
					return s.str(&c.Delta.Content)
				case "tool_calls":
					raw, err := s.raw()
					c.Delta.ToolCalls = raw
					return err
				}
				return s.skip()
			})
		}
		return s.skip()
	})
}
