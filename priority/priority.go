// Package priority is h3infer's one account of RFC 9218 urgency: the
// levels and their default, the parse of the Priority header, and the
// classes (urgent, normal, bulk) that every stage derives its behaviour
// from. A request's class is decided once, at admission, from one
// Classes value, and carried from there; no stage keeps a threshold of
// its own.
//
// It imports nothing of h3infer's and nothing of HTTP: callers hand it the
// header's lines.
package priority

import (
	"fmt"
	"strings"
)

// Urgency is an RFC 9218 urgency, 0 (most urgent) to 7.
type Urgency uint8

// Levels is the number of urgencies, and Default RFC 9218's default.
const (
	Levels          = 8
	Default Urgency = 3
	// Least is the least urgent level.
	Least Urgency = Levels - 1
)

// Valid reports whether u is one of the Levels.
func (u Urgency) Valid() bool { return u < Levels }

// Class is what an urgency means to the stages a request passes: the
// scheduler's reserved slots, the worker's loop thread, the ring's
// hand-off of a first token and the gateway's token coalescing.
type Class uint8

const (
	// Normal requests share slots and threads and hold their tokens
	// for the coalescer's window. It is the zero value, so a request
	// nobody classified is treated as ordinary work.
	Normal Class = iota
	// Urgent requests may take reserved slots, run on the worker loop's
	// own thread ahead of bulk work, and have every token flushed.
	Urgent
	// Bulk requests are background work by the client's own word: their
	// tokens are held longest, and their first token does not make the
	// ring's reader yield its thread.
	Bulk
)

func (c Class) String() string {
	switch c {
	case Urgent:
		return "urgent"
	case Bulk:
		return "bulk"
	}
	return "normal"
}

// Classes divides the urgencies into classes: 0..UrgentMax are urgent,
// BulkMin..7 bulk, those between normal. The zero value means
// DefaultClasses: BulkMin 0 could never be valid, so it cannot be a
// deliberate choice, while UrgentMax 0 (only u=0 urgent) is one.
type Classes struct {
	UrgentMax Urgency `json:"urgent_max"`
	BulkMin   Urgency `json:"bulk_min"`
}

// DefaultClasses: u=0..2 urgent, 3..5 normal (RFC 9218's default among
// them), 6..7 bulk.
var DefaultClasses = Classes{UrgentMax: 2, BulkMin: 6}

// OrDefault is c, or DefaultClasses for the zero value.
func (c Classes) OrDefault() Classes {
	if c == (Classes{}) {
		return DefaultClasses
	}
	return c
}

// Validate reports every problem with c, each naming its key under
// prefix ("priority", say): urgent_max must be 0..7 and bulk_min
// urgent_max+1..7, so that every class but normal is reachable and the
// order of the classes is the order of the urgencies.
func (c Classes) Validate(prefix string) []error {
	var errs []error
	if !c.UrgentMax.Valid() {
		errs = append(errs, fmt.Errorf("%s.urgent_max: must be 0..7, got %d", prefix, c.UrgentMax))
	}
	if c.BulkMin <= c.UrgentMax || !c.BulkMin.Valid() {
		errs = append(errs, fmt.Errorf("%s.bulk_min: must be urgent_max+1..7, got %d", prefix, c.BulkMin))
	}
	return errs
}

// Of is the class of urgency u.
func (c Classes) Of(u Urgency) Class {
	switch {
	case u <= c.UrgentMax:
		return Urgent
	case u >= c.BulkMin:
		return Bulk
	}
	return Normal
}

// Signal is an RFC 9218 priority signal as a client sent it.
type Signal struct {
	Urgency     Urgency
	Incremental bool
	// HasUrgency says the client named an urgency; otherwise Urgency is
	// Default and whoever admits the request may apply its own.
	HasUrgency bool
	// HasIncremental says the client said i one way or the other.
	HasIncremental bool
}

// Parse reads the lines of a Priority header, a Structured Fields
// dictionary (RFC 8941) of which RFC 9218 defines u (integer 0..7, default
// 3) and i (boolean, default false). Several lines form one dictionary; a
// later member replaces an earlier one of the same key. Members that are
// not well formed, unknown keys, parameters and values of the wrong type
// or out of range are ignored, as RFC 9218 asks, so the parse never fails.
func Parse(lines []string) Signal {
	p := Signal{Urgency: Default}
	for _, line := range lines {
		for member := range strings.SplitSeq(line, ",") {
			member = strings.Trim(member, " \t")
			// Parameters (";a=b") qualify the member; RFC 9218 defines none.
			member, _, _ = strings.Cut(member, ";")
			key, value, hasValue := strings.Cut(member, "=")
			switch key {
			case "u":
				if u, ok := sfUrgency(value); ok {
					p.Urgency, p.HasUrgency = u, true
				}
			case "i":
				switch {
				case !hasValue, value == "?1":
					p.Incremental, p.HasIncremental = true, true
				case value == "?0":
					p.Incremental, p.HasIncremental = false, true
				}
			}
		}
	}
	return p
}

// String writes p back as a Priority field value.
func (p Signal) String() string {
	s := "u=" + string(rune('0'+p.Urgency))
	if p.Incremental {
		s += ", i"
	}
	return s
}

// sfUrgency parses a Structured Fields integer (1 to 15 digits, no sign
// for a valid urgency) and accepts it when it is 0..7.
func sfUrgency(v string) (Urgency, bool) {
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
		if n > int(Least) {
			return 0, false
		}
	}
	return Urgency(n), true
}
