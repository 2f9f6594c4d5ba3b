package tokenize

import (
	"strings"
	"unicode/utf8"
)

// Stream turns generated token bytes into text that is safe to send:
// it never emits half a UTF-8 character, and it holds back any tail that
// could be the start of a stop string until the following text rules that
// out. A stop string itself is never emitted.
type Stream struct {
	stops   []string
	partial []byte // an incomplete UTF-8 sequence at the end of the output
	held    string // complete text that may begin a stop string
	stopped bool
}

func NewStream(stops []string) *Stream {
	var nonEmpty []string
	for _, s := range stops {
		if s != "" {
			nonEmpty = append(nonEmpty, s)
		}
	}
	return &Stream{stops: nonEmpty}
}

// Push adds the bytes of one token and returns the text that can be sent
// now. stop reports that a stop string was completed; the returned text is
// then everything before it, and further pushes must not happen.
func (s *Stream) Push(b string) (text string, stop bool) {
	// Most tokens of most requests: whole characters, nothing held back,
	// no stop string to look for. The piece is the text, as it is.
	if len(s.partial) == 0 && s.held == "" && len(s.stops) == 0 && utf8.ValidString(b) {
		return b, false
	}
	s.partial = append(s.partial, b...)
	cut := len(s.partial) - incompleteTail(s.partial)
	// Invalid bytes can never become a character; they are replaced here
	// so that the ring and the client only ever see valid UTF-8.
	pending := s.held + strings.ToValidUTF8(string(s.partial[:cut]), "\uFFFD")
	s.partial = append(s.partial[:0], s.partial[cut:]...)

	if i := s.firstStop(pending); i >= 0 {
		s.held, s.partial, s.stopped = "", nil, true
		return pending[:i], true
	}
	keep := s.stopPrefixLen(pending)
	s.held = pending[len(pending)-keep:]
	return pending[:len(pending)-keep], false
}

// Flush ends the stream and returns whatever was held back.
func (s *Stream) Flush() string {
	if s.stopped {
		return ""
	}
	out := s.held + strings.ToValidUTF8(string(s.partial), "\uFFFD")
	s.held, s.partial = "", nil
	return out
}

// firstStop is the index of the earliest stop string in text, or -1.
func (s *Stream) firstStop(text string) int {
	first := -1
	for _, stop := range s.stops {
		if i := strings.Index(text, stop); i >= 0 && (first < 0 || i < first) {
			first = i
		}
	}
	return first
}

// stopPrefixLen is the length of the longest suffix of text that is a
// proper prefix of some stop string.
func (s *Stream) stopPrefixLen(text string) int {
	longest := 0
	for _, stop := range s.stops {
		for n := min(len(stop)-1, len(text)); n > longest; n-- {
			if strings.HasSuffix(text, stop[:n]) {
				longest = n
				break
			}
		}
	}
	return longest
}

// incompleteTail is the length of a trailing byte sequence of b that is the
// beginning of a UTF-8 character still missing continuation bytes.
func incompleteTail(b []byte) int {
	for k := 1; k <= utf8.UTFMax-1 && k <= len(b); k++ {
		c := b[len(b)-k]
		if c&0xC0 == 0x80 {
			continue // a continuation byte: look further back for the start
		}
		if !utf8.FullRune(b[len(b)-k:]) {
			return k
		}
		return 0
	}
	return 0
}
