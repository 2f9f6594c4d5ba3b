// Package toolcall knows how model families write function calls in
// their text: which family a chat template belongs to, how to find the
// calls in a completion as it streams (Parser), and the text around a
// call's arguments that constrained decoding forces (Syntax). It speaks
// only infer's vocabulary and knows nothing of models, HTTP or the ring.
package toolcall

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"h3infer/infer"
)

// Families of tool call syntax, as model.json's tool_format names them.
const (
	// Hermes writes each call as
	// <tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>:
	// Qwen 2.5 and 3, the Hermes models and many fine-tunes that follow
	// them.
	Hermes = "hermes"
	// Llama3JSON writes the answer as one JSON object
	// {"name": NAME, "parameters": {...}} (Llama 3.1, 3.2 and 3.3's
	// JSON tool calling), optionally after <|python_tag|>; several calls
	// are separated by semicolons.
	Llama3JSON = "llama3_json"
)

// Formats lists the families in the order docs and errors give them.
func Formats() []string { return []string{Hermes, Llama3JSON} }

// Known reports whether f names a family.
func Known(f string) bool { return slices.Contains(Formats(), f) }

// Detect names the family a chat template's source writes calls in, ""
// when it shows none: the markers a family's template teaches its model
// to write are in the template's own text.
func Detect(template string) string {
	switch {
	case strings.Contains(template, "<tool_call>"):
		return Hermes
	case strings.Contains(template, "<|python_tag|>"),
		strings.Contains(template, "ipython") && strings.Contains(template, `"parameters": `):
		return Llama3JSON
	}
	return ""
}

// Syntax is the text a family writes around the arguments of one call of
// the function name, for constrained decoding: Prefix, the arguments as a
// JSON object, Suffix. The arguments object is the last member of the
// call's object, so the Suffix closes it.
func Syntax(format, name string) (prefix, suffix string, err error) {
	q, _ := json.Marshal(name)
	switch format {
	case Hermes:
		return `<tool_call>` + "\n" + `{"name": ` + string(q) + `, "arguments": `, "}\n</tool_call>", nil
	case Llama3JSON:
		return `{"name": ` + string(q) + `, "parameters": `, "}", nil
	}
	return "", "", fmt.Errorf("toolcall: unknown format %q", format)
}

// NewID is a fresh call id in OpenAI's form, call_ and 24 random
// characters.
func NewID() string { return "call_" + rand.Text()[:24] }

// Parser finds the calls of one completion in its text as it streams.
// Text that is no call is content; a call's text is held back until the
// call is whole, then answered as two deltas (its id and name, then its
// arguments), as OpenAI streams a call. Text that looked like a call and
// was not (a name no tool has, arguments that are no JSON object) is
// content after all. It is not safe for concurrent use.
type Parser struct {
	format string
	names  []string
	buf    string // text not yet answered
	inCall bool
	marker int // the length of the open call's opening marker
	// atStart says no content has gone out since the completion began or
	// the last call ended: where Llama3JSON's calls may begin.
	atStart bool
	calls   uint32
}

// NewParser parses calls in format of the functions names.
func NewParser(format string, names []string) *Parser {
	return &Parser{format: format, names: names, atStart: true}
}

// Calls is how many calls the parser has answered.
func (p *Parser) Calls() int { return int(p.calls) }

// open is where the family's call opens in s, and the length of its
// marker; -1 when s has no opening. partial is how many bytes at the end
// of s might begin one, to hold back.
func (p *Parser) open(s string) (at, marker, partial int) {
	switch p.format {
	case Hermes:
		const m = "<tool_call>"
		if i := strings.Index(s, m); i >= 0 {
			return i, len(m), 0
		}
		return -1, 0, partialSuffix(s, m)
	case Llama3JSON:
		if !p.atStart {
			return -1, 0, 0
		}
		t := strings.TrimLeft(s, " \t\r\n;")
		if t == "" {
			return -1, 0, len(s) // only what may precede a call: wait
		}
		if t[0] == '{' {
			// The white space and semicolons before a call are its
			// opening: a call's syntax, and content again should the
			// call not parse.
			return 0, len(s) - len(t), 0
		}
	}
	return -1, 0, 0
}

// partialSuffix is the length of the longest end of s that begins m.
func partialSuffix(s, m string) int {
	for n := min(len(s), len(m)-1); n > 0; n-- {
		if strings.HasSuffix(s, m[:n]) {
			return n
		}
	}
	return 0
}

// body finds the end of the call that s (after its opening) holds: the
// length of its body and of what closes it; ok false while it is not
// whole.
func (p *Parser) body(s string) (n, closer int, ok bool) {
	switch p.format {
	case Hermes:
		const m = "</tool_call>"
		if i := strings.Index(s, m); i >= 0 {
			return i, len(m), true
		}
	case Llama3JSON:
		if end, whole := jsonEnd(s); whole {
			return end, 0, true
		}
	}
	return 0, 0, false
}

// jsonEnd is the end of the JSON object or array s starts with (after
// white space); whole is false while it is still open. Anything else at
// the start ends it there, so that it fails to parse as a call.
func jsonEnd(s string) (end int, whole bool) {
	depth, inString, escaped := 0, false, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '{' || c == '[':
			depth++
		case c == '}' || c == ']':
			if depth--; depth == 0 {
				return i + 1, true
			}
		case depth == 0 && c != ' ' && c != '\t' && c != '\r' && c != '\n':
			return i + 1, true
		}
	}
	return 0, false
}

// Push reads the next text of the completion and returns the content
// that may go out and the deltas of the calls it completed.
func (p *Parser) Push(text string) (content string, calls []infer.ToolCallDelta) {
	p.buf += text
	var out strings.Builder
	for {
		if !p.inCall {
			at, marker, partial := p.open(p.buf)
			if at < 0 {
				keep := len(p.buf) - partial
				p.release(&out, p.buf[:keep])
				p.buf = p.buf[keep:]
				return out.String(), calls
			}
			p.release(&out, p.buf[:at])
			p.buf, p.inCall, p.marker = p.buf[at:], true, marker
		}
		n, closer, ok := p.body(p.buf[p.marker:])
		if !ok {
			return out.String(), calls
		}
		whole := p.buf[:p.marker+n+closer]
		p.buf, p.inCall = p.buf[len(whole):], false
		if !p.parse(whole[p.marker:p.marker+n], &calls) {
			p.release(&out, whole)
			continue
		}
		p.atStart = true
	}
}

// Flush ends the completion: a call still open is answered if its text
// parses as one (a model may end without the closing marker), else it is
// content, as is any text held back.
func (p *Parser) Flush() (content string, calls []infer.ToolCallDelta) {
	var out strings.Builder
	if p.inCall {
		if !p.parse(p.buf[p.marker:], &calls) {
			p.release(&out, p.buf)
		}
	} else {
		p.release(&out, p.buf)
	}
	p.buf, p.inCall = "", false
	return out.String(), calls
}

// release writes content; content other than white space ends the place
// where a Llama3JSON call may start.
func (p *Parser) release(out *strings.Builder, s string) {
	if strings.TrimSpace(s) != "" {
		p.atStart = false
	}
	out.WriteString(s)
}

// call is one call as the families write it: arguments is Hermes's
// name, parameters Llama's.
type call struct {
	Name       string          `json:"name"`
	Arguments  json.RawMessage `json:"arguments"`
	Parameters json.RawMessage `json:"parameters"`
}

// parse appends to calls the deltas of the call in body and reports
// whether body was one: an object with the name of one of the tools and
// arguments that are a JSON object (or a string holding one, as some
// models write them).
func (p *Parser) parse(body string, calls *[]infer.ToolCallDelta) bool {
	var c call
	dec := json.NewDecoder(strings.NewReader(body))
	if dec.Decode(&c) != nil || dec.InputOffset() != int64(len(strings.TrimRight(body, " \t\r\n"))) {
		return false
	}
	if !slices.Contains(p.names, c.Name) {
		return false
	}
	args := c.Arguments
	if p.format == Llama3JSON && args == nil {
		args = c.Parameters
	}
	args = bytes.TrimSpace(args)
	if len(args) > 0 && args[0] == '"' {
		var s string
		if json.Unmarshal(args, &s) != nil {
			return false
		}
		args = bytes.TrimSpace([]byte(s))
	}
	if len(args) == 0 || bytes.Equal(args, []byte("null")) {
		args = []byte("{}")
	}
	var obj map[string]json.RawMessage
	if args[0] != '{' || json.Unmarshal(args, &obj) != nil {
		return false
	}
	*calls = append(*calls,
		infer.ToolCallDelta{Index: p.calls, ID: NewID(), Name: c.Name},
		infer.ToolCallDelta{Index: p.calls, Arguments: string(args)})
	p.calls++
	return true
}
