package gateway

import (
	"net/http"
	"strings"
)

// priority is an RFC 9218 priority signal.
type priority struct {
	urgency        uint8
	incremental    bool
	hasUrgency     bool // the client named an urgency; otherwise the tenant default applies
	hasIncremental bool // the client said i one way or the other
}

// streamIncremental is the incremental flag of a streamed (SSE) response:
// what the client said, else true. RFC 9218's default of false tells
// quic-go to send same-urgency streams one after the other, each to its
// end, which is right for a file the client cannot use until it is whole
// and wrong for tokens read as they come: under load a new stream's first
// token waited for every older stream to finish. RFC 9218 lets a server
// weigh what it knows of the response where the client said nothing.
func (p priority) streamIncremental() bool {
	return p.incremental || !p.hasIncremental
}

// parsePriority reads the Priority request header, a Structured Fields
// dictionary (RFC 8941) of which RFC 9218 defines u (integer 0..7, default
// 3) and i (boolean, default false). Several header lines form one
// dictionary; a later member replaces an earlier one of the same key.
// Members that are not well formed, unknown keys, parameters and values of
// the wrong type or out of range are ignored, as RFC 9218 asks, so the
// parse never fails.
func parsePriority(h http.Header) priority {
	p := priority{urgency: defaultPriorityUrgency}
	for _, line := range h.Values("Priority") {
		for member := range strings.SplitSeq(line, ",") {
			member = strings.Trim(member, " \t")
			// Parameters (";a=b") qualify the member; RFC 9218 defines none.
			member, _, _ = strings.Cut(member, ";")
			key, value, hasValue := strings.Cut(member, "=")
			switch key {
			case "u":
				if u, ok := sfUrgency(value); ok {
					p.urgency, p.hasUrgency = u, true
				}
			case "i":
				switch {
				case !hasValue, value == "?1":
					p.incremental, p.hasIncremental = true, true
				case value == "?0":
					p.incremental, p.hasIncremental = false, true
				}
			}
		}
	}
	return p
}

// String writes p back as a Priority field value.
func (p priority) String() string {
	s := "u=" + string(rune('0'+p.urgency))
	if p.incremental {
		s += ", i"
	}
	return s
}

// sfUrgency parses a Structured Fields integer (1 to 15 digits, no sign
// for a valid urgency) and accepts it when it is 0..7.
func sfUrgency(v string) (uint8, bool) {
	if len(v) == 0 || len(v) > 15 {
		return 0, false
	}
	n := 0
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
		if n > maxPriorityUrgency {
			return 0, false
		}
	}
	return uint8(n), true
}
