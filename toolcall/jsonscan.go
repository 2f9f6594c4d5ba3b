package toolcall

// argScan checks, a byte at a time, that a call's arguments are a prefix
// of one JSON object, and says where the object ends: what a parser
// needs to stream arguments as the model writes them and never pass on
// a byte that is not theirs. It keeps no text, only where it is in the
// grammar, so each byte costs the same however long the arguments.
type argScan struct {
	stack []byte // the open containers, '{' or '['
	st    scanState
	key   bool   // the string being read is an object's key
	lit   string // the rest of true, false or null being read
	num   numState
	hex   int // \u digits still to read
}

type scanState uint8

const (
	sStart        scanState = iota // before the object's '{'
	sValue                         // a value must follow (after ':' or ',' in an array)
	sValueOrClose                  // after '[': a value or ']'
	sKeyOrClose                    // after '{': a key or '}'
	sKey                           // after ',' in an object: a key
	sColon                         // after a key
	sAfter                         // after a value: ',' or the container's close
	sString
	sEscape
	sHex
	sLiteral
	sNumber
	sDone // the object is closed
)

type numState uint8

const (
	nMinus     numState = iota // after '-'
	nZero                      // a leading 0
	nInt                       // integer digits
	nDot                       // after '.'
	nFrac                      // fraction digits
	nExp                       // after 'e'
	nExpSign                   // after the exponent's sign
	nExpDigits                 // exponent digits
)

// maxArgDepth bounds the nesting of arguments a parser follows: the
// stack is the only memory the scan grows, and a model could open
// brackets without end.
const maxArgDepth = 128

// Result of feeding one byte.
type scanResult uint8

const (
	scanOK    scanResult = iota // the byte continues the object
	scanEnd                     // the byte closed the object
	scanBreak                   // the byte cannot continue it
)

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// feed reads byte c of the arguments.
func (a *argScan) feed(c byte) scanResult {
	for {
		r, again := a.step(c)
		if !again {
			return r
		}
	}
}

// step reads c; again means a number ended before c and c must be read
// in the state after it.
func (a *argScan) step(c byte) (scanResult, bool) {
	switch a.st {
	case sStart:
		if c != '{' {
			return scanBreak, false
		}
		return a.open(c), false
	case sDone:
		return scanBreak, false
	case sString:
		switch {
		case c == '"':
			if a.key {
				a.st = sColon
			} else {
				a.st = sAfter
			}
		case c == '\\':
			a.st = sEscape
		case c < 0x20:
			return scanBreak, false
		}
		return scanOK, false
	case sEscape:
		switch c {
		case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			a.st = sString
		case 'u':
			a.st, a.hex = sHex, 4
		default:
			return scanBreak, false
		}
		return scanOK, false
	case sHex:
		if !isHex(c) {
			return scanBreak, false
		}
		if a.hex--; a.hex == 0 {
			a.st = sString
		}
		return scanOK, false
	case sLiteral:
		if c != a.lit[0] {
			return scanBreak, false
		}
		if a.lit = a.lit[1:]; a.lit == "" {
			a.st = sAfter
		}
		return scanOK, false
	case sNumber:
		if a.number(c) {
			return scanOK, false
		}
		if !a.numberMayEnd() {
			return scanBreak, false
		}
		a.st = sAfter
		return scanOK, true
	}
	if isSpace(c) {
		return scanOK, false
	}
	switch a.st {
	case sValue, sValueOrClose:
		if c == ']' && a.st == sValueOrClose {
			return a.close(c), false
		}
		return a.value(c), false
	case sKeyOrClose, sKey:
		switch {
		case c == '"':
			a.st, a.key = sString, true
			return scanOK, false
		case c == '}' && a.st == sKeyOrClose:
			return a.close(c), false
		}
	case sColon:
		if c == ':' {
			a.st = sValue
			return scanOK, false
		}
	case sAfter:
		top := a.stack[len(a.stack)-1]
		switch {
		case c == ',' && top == '{':
			a.st = sKey
			return scanOK, false
		case c == ',':
			a.st = sValue
			return scanOK, false
		case c == '}' && top == '{', c == ']' && top == '[':
			return a.close(c), false
		}
	}
	return scanBreak, false
}

func (a *argScan) value(c byte) scanResult {
	switch {
	case c == '{' || c == '[':
		return a.open(c)
	case c == '"':
		a.st, a.key = sString, false
	case c == 't':
		a.st, a.lit = sLiteral, "rue"
	case c == 'f':
		a.st, a.lit = sLiteral, "alse"
	case c == 'n':
		a.st, a.lit = sLiteral, "ull"
	case c == '-':
		a.st, a.num = sNumber, nMinus
	case c == '0':
		a.st, a.num = sNumber, nZero
	case c >= '1' && c <= '9':
		a.st, a.num = sNumber, nInt
	default:
		return scanBreak
	}
	return scanOK
}

func (a *argScan) open(c byte) scanResult {
	if len(a.stack) >= maxArgDepth {
		return scanBreak
	}
	a.stack = append(a.stack, c)
	if c == '{' {
		a.st = sKeyOrClose
	} else {
		a.st = sValueOrClose
	}
	return scanOK
}

func (a *argScan) close(byte) scanResult {
	a.stack = a.stack[:len(a.stack)-1]
	if len(a.stack) == 0 {
		a.st = sDone
		return scanEnd
	}
	a.st = sAfter
	return scanOK
}

// number reads c as part of a number, reporting whether it is one.
func (a *argScan) number(c byte) bool {
	digit := c >= '0' && c <= '9'
	switch a.num {
	case nMinus:
		switch {
		case c == '0':
			a.num = nZero
		case digit:
			a.num = nInt
		default:
			return false
		}
	case nZero, nInt:
		switch {
		case digit && a.num == nInt:
		case c == '.':
			a.num = nDot
		case c == 'e' || c == 'E':
			a.num = nExp
		default:
			return false
		}
	case nDot, nFrac:
		switch {
		case digit:
			a.num = nFrac
		case (c == 'e' || c == 'E') && a.num == nFrac:
			a.num = nExp
		default:
			return false
		}
	case nExp:
		switch {
		case c == '+' || c == '-':
			a.num = nExpSign
		case digit:
			a.num = nExpDigits
		default:
			return false
		}
	case nExpSign, nExpDigits:
		if !digit {
			return false
		}
		a.num = nExpDigits
	}
	return true
}

func (a *argScan) numberMayEnd() bool {
	return a.num == nZero || a.num == nInt || a.num == nFrac || a.num == nExpDigits
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}
