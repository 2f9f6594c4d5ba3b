package constrain

import (
	"encoding/binary"
	"slices"
)

// A State is where a matcher stands in the text it has read: the parses of
// that text the grammar allows, each a stack of frames, the innermost
// last. Alternatives (anyOf, enum values, a number that may end or go on)
// make more than one parse; one that reads a byte it cannot take is
// dropped. Every parse a State holds can still be completed, so a State
// with any parse is a valid prefix. States are values: stepping one never
// changes it, and threads share their frames until one changes.
type State struct {
	threads []thread
}

type thread []frame

// frame is one node being read: pos is its phase or the byte reached in
// a literal, n a segment index, item count, digit count or the UTF-8
// continuation bytes still due, x the range the next continuation byte
// must fall in.
type frame struct {
	node int32
	pos  int32
	n    int32
	x    int32
}

// maxThreads bounds the parses a State keeps. Every parse can be
// completed, so dropping some narrows the choice of text but never leads
// into a dead end.
const maxThreads = 64

// Digit counts of numbers: enough for any number a model should write,
// and bounded so a number's states are few and end.
const (
	maxIntDigits  = 16
	maxFracDigits = 16
	maxExpDigits  = 3
)

// Start is the state before any text.
func (g *Grammar) Start() State {
	return State{threads: g.push(nil, g.root, nil)}
}

// Dead reports whether no parse is left: the text read is no prefix of a
// document the grammar accepts.
func (s State) Dead() bool { return len(s.threads) == 0 }

// Complete reports whether the text read is a whole document. The root is
// an object, so a complete document takes no more bytes.
func (s State) Complete() bool {
	for _, t := range s.threads {
		if len(t) == 0 {
			return true
		}
	}
	return false
}

// Advance reads text from s.
func (g *Grammar) Advance(s State, text string) State {
	var buf []thread
	for i := 0; i < len(text) && !s.Dead(); i++ {
		s, buf = g.step(s, text[i], buf[:0])
	}
	return s
}

// step reads one byte; buf is scratch. When every parse stays as it was
// (inside a string, say), step returns s itself and allocates nothing.
func (g *Grammar) step(s State, b byte, buf []thread) (State, []thread) {
	for _, t := range s.threads {
		buf = g.feed(t, b, buf)
	}
	if len(buf) == len(s.threads) {
		same := true
		for i, t := range buf {
			if len(t) != len(s.threads[i]) || len(t) > 0 && &t[0] != &s.threads[i][0] {
				same = false
				break
			}
		}
		if same {
			return s, buf
		}
	}
	out := make([]thread, 0, min(len(buf), maxThreads))
	for _, t := range buf {
		if len(out) == maxThreads {
			break
		}
		if !slices.ContainsFunc(out, func(o thread) bool { return slices.Equal(o, t) }) {
			out = append(out, t)
		}
	}
	return State{threads: out}, buf
}

// appendKey appends an encoding of s that equal states share: the key of
// the mask cache.
func (s State) appendKey(b []byte) []byte {
	for _, t := range s.threads {
		b = binary.AppendUvarint(b, uint64(len(t)))
		for _, f := range t {
			b = binary.AppendUvarint(b, uint64(f.node))
			b = binary.AppendUvarint(b, uint64(f.pos))
			b = binary.AppendUvarint(b, uint64(f.n))
			b = append(b, byte(f.x))
		}
	}
	return b
}

// withTop is t with its innermost frame replaced by f, t unchanged.
func withTop(t thread, f frame) thread {
	nt := make(thread, len(t), len(t)+2)
	copy(nt, t)
	nt[len(nt)-1] = f
	return nt
}

// pop is t without its innermost frame; appending to it copies.
func pop(t thread) thread { return slices.Clip(t[:len(t)-1]) }

// push appends to out the parses of t followed by the start of node id:
// one per alternative where id is a choice.
func (g *Grammar) push(t thread, id int32, out []thread) []thread {
	n := &g.nodes[id]
	if n.kind == kAnyOf {
		for _, c := range n.children {
			if len(t) >= MaxDepth && g.nodes[c].kind >= kAnyObject {
				continue // a json_object document as deep as it may go
			}
			out = g.push(t, c, out)
		}
		return out
	}
	nt := make(thread, len(t)+1, len(t)+2)
	copy(nt, t)
	nt[len(t)] = frame{node: id}
	return append(out, nt)
}

// feed appends to out what t becomes on reading b: nothing when t cannot
// take it.
func (g *Grammar) feed(t thread, b byte, out []thread) []thread {
	if len(t) == 0 {
		return out // a complete document takes no more bytes
	}
	f := t[len(t)-1]
	n := &g.nodes[f.node]
	switch n.kind {
	case kLiteral:
		if b != n.lit[f.pos] {
			return out
		}
		if int(f.pos)+1 == len(n.lit) {
			return append(out, pop(t))
		}
		f.pos++
		return append(out, withTop(t, f))
	case kString:
		return g.feedString(t, f, b, out)
	case kNumber, kInteger:
		if next, ok := numberByte(f, b, n.kind == kInteger); ok {
			out = append(out, withTop(t, next))
		}
		if numberMayEnd(f) {
			out = g.feed(pop(t), b, out)
		}
		return out
	case kObject:
		seg := n.segs[f.n]
		if b != seg[f.pos] {
			return out
		}
		if int(f.pos)+1 < len(seg) {
			f.pos++
			return append(out, withTop(t, f))
		}
		if int(f.n) == len(n.segs)-1 {
			return append(out, pop(t))
		}
		return g.push(withTop(t, frame{node: f.node, n: f.n + 1}), n.children[f.n], out)
	case kArray:
		return g.feedArray(t, f, n, b, out)
	case kAnyObject:
		return g.feedAnyObject(t, f, b, out)
	case kAnyArray:
		switch {
		case f.pos == 0 && b == '[':
			return append(out, withTop(t, frame{node: f.node, pos: 1}))
		case (f.pos == 1 || f.pos == 2) && b == ']':
			return append(out, pop(t))
		case f.pos == 2 && b == ',':
			return append(out, withTop(t, frame{node: f.node, pos: 3}))
		case f.pos == 1 || f.pos == 3:
			return g.pushFeed(withTop(t, frame{node: f.node, pos: 2}), anyValue, b, out)
		}
	}
	return out
}

// anyValue is the node of json_object's values (see anyObject), and
// anyString its strings.
const (
	anyValue  = 1
	anyString = 3
)

// pushFeed pushes node id onto t and feeds b to each resulting parse.
func (g *Grammar) pushFeed(t thread, id int32, b byte, out []thread) []thread {
	var starts [8]thread
	for _, s := range g.push(t, id, starts[:0]) {
		out = g.feed(s, b, out)
	}
	return out
}

func (g *Grammar) feedArray(t thread, f frame, n *node, b byte, out []thread) []thread {
	// pos: 0 before '[', 1 after it, 2 after an item, 3 after a comma;
	// n counts items up to what the bounds need to tell apart.
	cap := n.max
	if cap < 0 {
		cap = max(n.min, 1)
	}
	switch f.pos {
	case 0:
		if b == '[' {
			return append(out, withTop(t, frame{node: f.node, pos: 1}))
		}
		return out
	case 1, 2:
		if b == ']' && f.n >= n.min {
			return append(out, pop(t))
		}
		if f.pos == 2 {
			if b == ',' && (n.max < 0 || f.n < n.max) {
				return append(out, withTop(t, frame{node: f.node, pos: 3, n: f.n}))
			}
			return out
		}
		if n.max == 0 {
			return out
		}
	}
	return g.pushFeed(withTop(t, frame{node: f.node, pos: 2, n: min(f.n+1, cap)}), n.children[0], b, out)
}

func (g *Grammar) feedAnyObject(t thread, f frame, b byte, out []thread) []thread {
	// pos: 0 before '{', 1 after it, 2 after a key, 3 after a value,
	// 4 after a comma.
	switch {
	case f.pos == 0 && b == '{':
		return append(out, withTop(t, frame{node: f.node, pos: 1}))
	case (f.pos == 1 || f.pos == 3) && b == '}':
		return append(out, pop(t))
	case (f.pos == 1 || f.pos == 4) && b == '"':
		return g.pushFeed(withTop(t, frame{node: f.node, pos: 2}), anyString, b, out)
	case f.pos == 2 && b == ':':
		return g.push(withTop(t, frame{node: f.node, pos: 3}), anyValue, out)
	case f.pos == 3 && b == ',':
		return append(out, withTop(t, frame{node: f.node, pos: 4}))
	}
	return out
}

// UTF-8 ranges of a continuation byte (x): any, or the narrower second
// bytes that rule out overlong forms, surrogates and code points past
// U+10FFFF.
var contRange = [...][2]byte{{0x80, 0xbf}, {0xa0, 0xbf}, {0x80, 0x9f}, {0x90, 0xbf}, {0x80, 0x8f}}

func (g *Grammar) feedString(t thread, f frame, b byte, out []thread) []thread {
	// pos: 0 before the quote, 1 inside, 2 after a backslash, 3 in the
	// hex digits of \u (n still due).
	switch f.pos {
	case 0:
		if b != '"' {
			return out
		}
		f.pos = 1
	case 1:
		if f.n > 0 {
			r := contRange[f.x]
			if b < r[0] || b > r[1] {
				return out
			}
			f.n, f.x = f.n-1, 0
			break
		}
		switch {
		case b == '"':
			return append(out, pop(t))
		case b == '\\':
			f.pos = 2
		case b < 0x20:
			return out
		case b < 0x80:
			return append(out, t) // unchanged: most of a string's bytes
		case b >= 0xc2 && b <= 0xdf:
			f.n = 1
		case b >= 0xe0 && b <= 0xef:
			f.n = 2
			switch b {
			case 0xe0:
				f.x = 1
			case 0xed:
				f.x = 2
			}
		case b >= 0xf0 && b <= 0xf4:
			f.n = 3
			switch b {
			case 0xf0:
				f.x = 3
			case 0xf4:
				f.x = 4
			}
		default:
			return out
		}
	case 2:
		switch b {
		case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			f.pos = 1
		case 'u':
			f.pos, f.n = 3, 4
		default:
			return out
		}
	case 3:
		if !('0' <= b && b <= '9' || 'a' <= b && b <= 'f' || 'A' <= b && b <= 'F') {
			return out
		}
		if f.n--; f.n == 0 {
			f.pos = 1
		}
	}
	return append(out, withTop(t, f))
}

// Number phases: 0 start, 1 after '-', 2 after a leading 0, 3 in the
// integer's digits, 4 after '.', 5 in the fraction, 6 after 'e', 7 after
// the exponent's sign, 8 in the exponent.
func numberMayEnd(f frame) bool {
	return f.pos == 2 || f.pos == 3 || f.pos == 5 || f.pos == 8
}

func numberByte(f frame, b byte, integer bool) (frame, bool) {
	digit := '0' <= b && b <= '9'
	to := func(pos, n int32) (frame, bool) { return frame{node: f.node, pos: pos, n: n}, true }
	switch f.pos {
	case 0, 1:
		switch {
		case b == '-' && f.pos == 0:
			return to(1, 0)
		case b == '0':
			return to(2, 0)
		case digit:
			return to(3, 1)
		}
	case 2, 3:
		switch {
		case digit && f.pos == 3 && f.n < maxIntDigits:
			return to(3, f.n+1)
		case integer:
		case b == '.':
			return to(4, 0)
		case b == 'e' || b == 'E':
			return to(6, 0)
		}
	case 4:
		if digit {
			return to(5, 1)
		}
	case 5:
		switch {
		case digit && f.n < maxFracDigits:
			return to(5, f.n+1)
		case b == 'e' || b == 'E':
			return to(6, 0)
		}
	case 6, 7:
		switch {
		case (b == '+' || b == '-') && f.pos == 6:
			return to(7, 0)
		case digit:
			return to(8, 1)
		}
	case 8:
		if digit && f.n < maxExpDigits {
			return to(8, f.n+1)
		}
	}
	return f, false
}
