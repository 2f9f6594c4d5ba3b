package gateway

import (
	"net/http"
	"strings"
	"testing"
)

func TestParsePriority(t *testing.T) {
	tests := map[string]struct {
		header []string
		want   priority
	}{
		"absent":                {nil, priority{urgency: 3}},
		"urgent":                {[]string{"u=0"}, priority{urgency: 0, hasUrgency: true}},
		"incremental bare":      {[]string{"u=5, i"}, priority{urgency: 5, incremental: true, hasUrgency: true, hasIncremental: true}},
		"incremental true":      {[]string{"i=?1,u=6"}, priority{urgency: 6, incremental: true, hasUrgency: true, hasIncremental: true}},
		"incremental false":     {[]string{"i, i=?0"}, priority{urgency: 3, hasIncremental: true}},
		"out of range ignored":  {[]string{"u=9"}, priority{urgency: 3}},
		"negative ignored":      {[]string{"u=-1"}, priority{urgency: 3}},
		"not a number":          {[]string{"u=x"}, priority{urgency: 3}},
		"leading zeros":         {[]string{"u=07"}, priority{urgency: 7, hasUrgency: true}},
		"decimal ignored":       {[]string{"u=1.0"}, priority{urgency: 3}},
		"last wins":             {[]string{"u=1", "u=5"}, priority{urgency: 5, hasUrgency: true}},
		"parameters ignored":    {[]string{"u=2;foo=bar, i;x"}, priority{urgency: 2, incremental: true, hasUrgency: true, hasIncremental: true}},
		"unknown keys ignored":  {[]string{"x=1, u=4, y"}, priority{urgency: 4, hasUrgency: true}},
		"whitespace tolerated":  {[]string{"  u=1 ,\ti  "}, priority{urgency: 1, incremental: true, hasUrgency: true, hasIncremental: true}},
		"i with a token value":  {[]string{"i=yes"}, priority{urgency: 3}},
		"u without a value":     {[]string{"u"}, priority{urgency: 3}},
		"empty members skipped": {[]string{",,u=6,,"}, priority{urgency: 6, hasUrgency: true}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			h := http.Header{}
			for _, v := range tc.header {
				h.Add("Priority", v)
			}
			if got := parsePriority(h); got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// FuzzParsePriority checks that any header value parses to a valid
// priority, and that what it parsed survives a round trip through String.
// Seeds: the cases above plus testdata/fuzz/FuzzParsePriority.
func FuzzParsePriority(f *testing.F) {
	for _, s := range []string{"", "u=0", "u=7, i", "i=?0", "u=3;a=b", "u=99", "u=-0", "u=1,u=2,i", "\x00u=1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		h := http.Header{}
		for line := range strings.SplitSeq(v, "\n") {
			h.Add("Priority", line)
		}
		p := parsePriority(h)
		if p.urgency > maxPriorityUrgency {
			t.Fatalf("%q: urgency %d out of range", v, p.urgency)
		}
		if !p.hasUrgency && p.urgency != defaultPriorityUrgency {
			t.Fatalf("%q: no urgency named but got %d", v, p.urgency)
		}
		back := parsePriority(http.Header{"Priority": {p.String()}})
		if back.urgency != p.urgency || back.incremental != p.incremental || !back.hasUrgency {
			t.Fatalf("%q: parsed %+v, its String %q parses to %+v", v, p, p.String(), back)
		}
	})
}

// TestStreamIncremental: token streams are sent incrementally unless the
// client asked for i=?0; RFC 9218's default of false would make quic-go
// send same-urgency streams one after the other.
func TestStreamIncremental(t *testing.T) {
	for header, want := range map[string]bool{"": true, "u=1": true, "u=5, i": true, "i=?1": true, "i=?0": false, "u=2, i=?0": false} {
		h := http.Header{}
		if header != "" {
			h.Set("Priority", header)
		}
		if got := parsePriority(h).streamIncremental(); got != want {
			t.Errorf("Priority %q: incremental %v, want %v", header, got, want)
		}
	}
}
