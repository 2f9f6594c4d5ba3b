package toolcall

import (
	"bytes"
	"encoding/json"
	"slices"
	"strings"

	"h3infer/infer"
)

// Parser finds the calls of one completion in its text as it streams,
// and answers them as OpenAI streams calls: a call's first delta (its
// index, id and name) as soon as the name is whole and is one the
// request offered and the arguments' object has begun, then each piece
// of the arguments as the model writes it. Text that is no call is
// content; the family's markers never are.
//
// A call streams when the model writes it in its family's own order
// (the name, then the arguments object). Whatever streams is checked as
// it comes: the name before the first delta, and every byte of the
// arguments against JSON's grammar, so the deltas of a call that ends
// well concatenate to exactly its arguments and nothing after them. A
// call written another way (arguments before the name, arguments as a
// string holding JSON, no arguments) is read whole, for the families
// that write JSON around their calls, and answered in two deltas once
// its end is found; text that looked like a call and is not (a name no
// tool has, a body that is no JSON object) is content after all.
//
// Should a model break the JSON of arguments that have begun to stream,
// the call ends with the arguments sent so far and the parser reads no
// more (Broken): the sequence ends there, as a client that holds a call
// must be told it is over. It is not safe for concurrent use.
type Parser struct {
	format string
	names  []string

	mode mode
	buf  string // text read in this mode and not yet answered
	// opening is the text that opened the block being read (a marker,
	// or the white space before a Llama call), for a block read whole
	// that turns out to be content.
	opening string
	first   bool    // Mistral: the header is its list's first
	args    argScan // the arguments being streamed
	end     jsonEnd // the end of a block read whole
	scanned int     // bytes of buf a whole block's end was looked for in
	// atStart says no content has gone out since the completion began or
	// the last call ended: where Llama3JSON's calls may begin.
	atStart bool

	calls uint32 // calls opened
	whole uint32 // calls whose arguments are whole

	out     strings.Builder       // content of this Push
	deltas  []infer.ToolCallDelta // deltas of this Push
	pending strings.Builder       // argument bytes of this Push not yet in a delta
}

type mode uint8

const (
	mText    mode = iota
	mHeader       // after a call's opening, before its arguments
	mArgs         // the arguments, streamed
	mTrailer      // after the arguments, to the end of the call
	mBetween      // DeepSeek V3: in the calls section, between calls
	mWhole        // a block read whole
	mBroken       // the arguments broke: nothing more is read
)

const (
	// maxSyntaxBytes bounds the text a call's header or trailer is
	// matched over, re-read on each piece; a longer one is no call.
	maxSyntaxBytes = 1024
	// maxWholeBytes bounds a block read whole; a longer one is content.
	maxWholeBytes = 1 << 16
	// maxNameBytes bounds a DeepSeek V3 call's name, which ends at a
	// newline rather than a quote.
	maxNameBytes = 256
)

// NewParser parses calls in format of the functions names.
func NewParser(format string, names []string) *Parser {
	return &Parser{format: format, names: names, atStart: true}
}

// Calls is how many calls the parser has opened.
func (p *Parser) Calls() int { return int(p.calls) }

// Whole is how many calls' arguments are whole.
func (p *Parser) Whole() int { return int(p.whole) }

// Broken reports whether the model broke the JSON of a call's arguments
// after they began to stream; the parser then reads no more.
func (p *Parser) Broken() bool { return p.mode == mBroken }

// Push reads the next text of the completion and returns the content
// that may go out and the deltas of the calls it advanced.
func (p *Parser) Push(text string) (content string, calls []infer.ToolCallDelta) {
	if p.mode == mBroken {
		return "", nil
	}
	p.buf += text
	p.run(false)
	return p.take()
}

// Flush ends the completion: a call whose arguments are streaming ends
// with what was sent (the completion was cut short), a block read whole
// is a call if its text parses as one (a model may end without the
// closing marker), and any other text held back is content.
func (p *Parser) Flush() (content string, calls []infer.ToolCallDelta) {
	p.run(true)
	if p.mode != mBroken {
		p.mode = mText
	}
	p.buf = ""
	return p.take()
}

func (p *Parser) take() (string, []infer.ToolCallDelta) {
	p.flushArgs()
	content, deltas := p.out.String(), p.deltas
	p.out.Reset()
	p.deltas = nil
	return content, deltas
}

// run reads buf in turn by each mode it leads to, until one needs more
// text; final means no more will come.
func (p *Parser) run(final bool) {
	for {
		switch p.mode {
		case mBroken:
			p.buf = ""
			return
		case mText:
			if !p.text(final) {
				return
			}
		case mHeader, mBetween, mTrailer:
			st, n := p.syntax()
			if st == stNeed && final && p.mode == mTrailer {
				// The call is whole; what is left is its syntax.
				p.buf, p.mode = "", mText
				return
			}
			if st == stNeed && (final || len(p.buf) > maxSyntaxBytes) {
				st = stFail
			}
			switch st {
			case stNeed:
				return
			case stFail:
				if p.mode == mTrailer {
					// The call is whole: what matched of its closing is
					// its syntax, and the rest is content.
					p.buf = p.buf[n:]
				}
				p.syntaxFailed()
			case stOK:
				p.buf = p.buf[n:]
			}
		case mArgs:
			if !p.readArgs() {
				return
			}
		case mWhole:
			if !p.readWhole(final) {
				return
			}
		}
	}
}

// release writes content; content other than white space ends the place
// where a Llama3JSON call may start.
func (p *Parser) release(s string) {
	if strings.TrimSpace(s) != "" {
		p.atStart = false
	}
	p.out.WriteString(s)
}

// text reads content until a call opens, reporting whether one did.
func (p *Parser) text(final bool) bool {
	if p.format == Llama3JSON {
		return p.llamaText(final)
	}
	at, marker := -1, ""
	for _, m := range p.markers() {
		if i := strings.Index(p.buf, m); i >= 0 && (at < 0 || i < at) {
			at, marker = i, m
		}
	}
	if at < 0 {
		keep := 0
		if !final {
			for _, m := range p.markers() {
				keep = max(keep, partialSuffix(p.buf, m))
			}
		}
		p.release(p.buf[:len(p.buf)-keep])
		p.buf = p.buf[len(p.buf)-keep:]
		return false
	}
	p.release(p.buf[:at])
	p.buf = p.buf[at+len(marker):]
	p.opening = marker
	switch marker {
	case hermesOpen:
		p.mode = mHeader
	case mistralOpen:
		p.mode, p.first = mHeader, true
	case deepseekSection:
		p.mode = mBetween
	case deepseekBegin:
		p.mode = mHeader
	}
	// DeepSeek V3's other markers, out of place, are dropped.
	return true
}

// markers are the texts text looks for: the family's openings, and for
// the families whose markers are special tokens, every marker, which
// never reaches content.
func (p *Parser) markers() []string {
	switch p.format {
	case Hermes:
		return []string{hermesOpen}
	case Mistral:
		return []string{mistralOpen}
	case DeepSeekV3:
		return deepseekMarkers
	}
	return nil
}

// llamaText is text for Llama3JSON, whose calls are the answer itself:
// a JSON object at the start, or after another call.
func (p *Parser) llamaText(final bool) bool {
	if !p.atStart {
		p.release(p.buf)
		p.buf = ""
		return false
	}
	t := strings.TrimLeft(p.buf, " \t\r\n;")
	switch {
	case t == "" && !final:
		return false // only what may precede a call: wait
	case t != "" && t[0] == '{':
		// The white space and semicolons before a call are its
		// opening: a call's syntax, and content again should the call
		// not parse.
		p.opening = p.buf[:len(p.buf)-len(t)]
		p.buf, p.mode = t, mHeader
		return true
	}
	p.release(p.buf)
	p.buf = ""
	return false
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

// syntax matches buf against the family's syntax of the present mode;
// on a match it has moved to the next mode.
func (p *Parser) syntax() (status, int) {
	c := &scan{s: p.buf}
	switch p.mode {
	case mHeader:
		var name string
		ok := false
		switch p.format {
		case Hermes:
			name, ok = objectHeader(c, "arguments")
		case Llama3JSON:
			name, ok = objectHeader(c, "parameters", "arguments")
		case Mistral:
			if p.first {
				c.ws()
				if !c.lit("[") {
					return c.result(false)
				}
			}
			name, ok = objectHeader(c, "arguments")
		case DeepSeekV3:
			name, ok = deepseekHeader(c)
		}
		if ok && !slices.Contains(p.names, name) {
			return stFail, 0
		}
		if ok {
			p.openCall(name)
		}
		return c.result(ok)
	case mBetween:
		c.ws()
		switch {
		case c.lit(deepseekBegin):
			p.mode = mHeader
			return c.result(true)
		case c.need:
			return stNeed, 0
		case c.lit(deepseekSectionEnd):
			p.mode = mText
			return c.result(true)
		}
		return c.result(false)
	}
	// mTrailer: the call's arguments are whole; what closes it.
	next := mText
	ok := false
	switch p.format {
	case Hermes:
		c.ws()
		ok = c.lit("}")
		c.ws()
		ok = ok && c.lit(hermesClose)
	case Llama3JSON:
		c.ws()
		if ok = c.lit("}"); ok {
			p.atStart = true
		}
	case Mistral:
		c.ws()
		ok = c.lit("}")
		c.ws()
		switch {
		case !ok:
		case c.lit(","):
			next, p.first = mHeader, false
		case c.need:
			ok = false
		default:
			ok = c.lit("]")
		}
	case DeepSeekV3:
		c.ws()
		if !c.lit("```") && c.need {
			return stNeed, 0
		}
		c.ws()
		ok, next = c.lit(deepseekEnd), mBetween
	}
	if ok {
		p.mode = next
	}
	return c.result(ok)
}

// objectHeader matches the start of a call written as a JSON object,
// {"name": NAME, "KEY": up to the arguments' '{', KEY one of keys.
func objectHeader(c *scan, keys ...string) (string, bool) {
	c.ws()
	if !c.lit("{") {
		return "", false
	}
	c.ws()
	if !c.lit(`"name"`) {
		return "", false
	}
	c.ws()
	if !c.lit(":") {
		return "", false
	}
	c.ws()
	name, ok := c.str()
	if !ok {
		return "", false
	}
	c.ws()
	if !c.lit(",") {
		return "", false
	}
	c.ws()
	need := false
	for _, k := range keys {
		if ok = c.lit(`"` + k + `"`); ok {
			break
		}
		need = need || c.need
	}
	if !ok {
		c.need = need
		return "", false
	}
	c.ws()
	if !c.lit(":") {
		return "", false
	}
	c.ws()
	return name, c.peek('{')
}

// deepseekHeader matches a DeepSeek V3 call after its begin marker, up
// to the arguments' '{': function<｜tool▁sep｜>NAME\n```json\n.
func deepseekHeader(c *scan) (string, bool) {
	if !c.lit("function") || !c.lit(deepseekSep) {
		return "", false
	}
	name, ok := c.until("\n", maxNameBytes)
	if !ok {
		return "", false
	}
	c.ws()
	if c.lit("```json") {
		c.ws()
	} else if c.need {
		return "", false
	}
	return strings.TrimSpace(name), c.peek('{')
}

// syntaxFailed leaves a header or trailer that is not the family's: a
// call that began another way is read whole where the family writes
// JSON around it, and otherwise the text is content (a trailer's call
// is whole already).
func (p *Parser) syntaxFailed() {
	if p.mode == mHeader && (p.format == Hermes || p.format == Llama3JSON || p.format == Mistral && p.first) {
		p.mode, p.end, p.scanned = mWhole, jsonEnd{}, 0
		return
	}
	p.mode = mText
}

// openCall answers the first delta of a call to name, whose arguments
// stream next.
func (p *Parser) openCall(name string) {
	p.deltas = append(p.deltas, infer.ToolCallDelta{Index: p.calls, ID: NewID(), Name: name})
	p.calls++
	p.mode = mArgs
	p.args = argScan{stack: p.args.stack[:0]}
}

// readArgs streams the arguments in buf, reporting whether they ended
// (so that buf goes on in another mode).
func (p *Parser) readArgs() bool {
	for i := 0; i < len(p.buf); i++ {
		switch p.args.feed(p.buf[i]) {
		case scanEnd:
			p.pending.WriteString(p.buf[:i+1])
			p.buf = p.buf[i+1:]
			p.flushArgs()
			p.whole++
			p.mode = mTrailer
			return true
		case scanBreak:
			p.pending.WriteString(p.buf[:i])
			p.buf = ""
			p.flushArgs()
			p.mode = mBroken
			return false
		}
	}
	p.pending.WriteString(p.buf)
	p.buf = ""
	return false
}

// flushArgs answers the argument bytes gathered as one delta.
func (p *Parser) flushArgs() {
	if p.pending.Len() == 0 {
		return
	}
	p.deltas = append(p.deltas, infer.ToolCallDelta{Index: p.calls - 1, Arguments: p.pending.String()})
	p.pending.Reset()
}

// readWhole reads a block whole: to its closing marker (Hermes) or the
// end of its JSON (Llama 3's object, Mistral's list), then answers its
// calls or, if it holds none, gives it back as content. It reports
// whether the block ended.
func (p *Parser) readWhole(final bool) bool {
	n, closer := -1, ""
	if p.format == Hermes {
		from := max(0, p.scanned-len(hermesClose)+1)
		if i := strings.Index(p.buf[from:], hermesClose); i >= 0 {
			n, closer = from+i, hermesClose
		}
	} else if e := p.end.read(p.buf[p.scanned:]); e >= 0 {
		n = p.scanned + e
	}
	p.scanned = len(p.buf)
	switch {
	case n >= 0:
	case final:
		n = len(p.buf)
	case len(p.buf) > maxWholeBytes:
		p.wholeIsContent(p.buf, "")
		p.buf, p.mode = "", mText
		return false
	default:
		return false
	}
	body := p.buf[:n]
	p.buf, p.mode = p.buf[n+len(closer):], mText
	if !p.answerWhole(body) {
		p.wholeIsContent(body, closer)
	}
	return true
}

// wholeIsContent gives back a block that held no call as content: as
// written, less Mistral's marker, a special token.
func (p *Parser) wholeIsContent(body, closer string) {
	if p.format != Mistral {
		p.release(p.opening)
	}
	p.release(body + closer)
}

// answerWhole answers the calls of a block read whole, reporting
// whether it was calls.
func (p *Parser) answerWhole(body string) bool {
	bodies := []string{body}
	if p.format == Mistral {
		var list []json.RawMessage
		if json.Unmarshal([]byte(body), &list) != nil || len(list) == 0 {
			return false
		}
		bodies = bodies[:0]
		for _, c := range list {
			bodies = append(bodies, string(c))
		}
	}
	names, args := make([]string, len(bodies)), make([][]byte, len(bodies))
	for i, b := range bodies {
		var ok bool
		if names[i], args[i], ok = p.parseCall(b); !ok {
			return false
		}
	}
	for i := range bodies {
		p.deltas = append(p.deltas,
			infer.ToolCallDelta{Index: p.calls, ID: NewID(), Name: names[i]},
			infer.ToolCallDelta{Index: p.calls, Arguments: string(args[i])})
		p.calls++
		p.whole++
	}
	if p.format == Llama3JSON {
		p.atStart = true
	}
	return true
}

// call is one call as the families write it: arguments is most
// families' name, parameters Llama's.
type call struct {
	Name       string          `json:"name"`
	Arguments  json.RawMessage `json:"arguments"`
	Parameters json.RawMessage `json:"parameters"`
}

// parseCall reads body as a call: an object with the name of one of the
// tools and arguments that are a JSON object (or a string holding one,
// as some models write them, or nothing, an empty object).
func (p *Parser) parseCall(body string) (string, []byte, bool) {
	var c call
	dec := json.NewDecoder(strings.NewReader(body))
	if dec.Decode(&c) != nil || dec.InputOffset() != int64(len(strings.TrimRight(body, " \t\r\n"))) {
		return "", nil, false
	}
	if !slices.Contains(p.names, c.Name) {
		return "", nil, false
	}
	args := c.Arguments
	if p.format == Llama3JSON && args == nil {
		args = c.Parameters
	}
	args = bytes.TrimSpace(args)
	if len(args) > 0 && args[0] == '"' {
		var s string
		if json.Unmarshal(args, &s) != nil {
			return "", nil, false
		}
		args = bytes.TrimSpace([]byte(s))
	}
	if len(args) == 0 || bytes.Equal(args, []byte("null")) {
		args = []byte("{}")
	}
	var obj map[string]json.RawMessage
	if args[0] != '{' || json.Unmarshal(args, &obj) != nil {
		return "", nil, false
	}
	return c.Name, args, true
}
