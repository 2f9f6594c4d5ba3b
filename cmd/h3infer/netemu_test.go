package main

import (
	"strconv"
	"testing"
)

func TestParseRate(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    int64
		wantErr bool
	}{
		"empty is unlimited":  {"", 0, false},
		"zero is unlimited":   {"0", 0, false},
		"zero with a unit":    {"0mbit", 0, false},
		"bits per second":     {"2000000", 2_000_000, false},
		"bit":                 {"300bit", 300, false},
		"kbit":                {"500kbit", 500_000, false},
		"mbit":                {"10mbit", 10_000_000, false},
		"gbit":                {"1gbit", 1_000_000_000, false},
		"any case":            {"10Mbit", 10_000_000, false},
		"largest":             {"9223372036854775807", 1<<63 - 1, false},
		"too large":           {"9223372036854775808", 0, true},
		"too large with unit": {"9223372037gbit", 0, true},
		"negative":            {"-1mbit", 0, true},
		"plus sign":           {"+1mbit", 0, true},
		"fraction":            {"1.5mbit", 0, true},
		"bytes, not bits":     {"10mb", 0, true},
		"unit alone":          {"mbit", 0, true},
		"space":               {"10 mbit", 0, true},
		"unknown unit":        {"10tbit", 0, true},
		"words":               {"fast", 0, true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := parseRate(tc.in)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Errorf("parseRate(%q): got %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.wantErr)
			}
		})
	}
}

// FuzzParseRate checks that any accepted rate is a number of bits per
// second that reads back as itself.
func FuzzParseRate(f *testing.F) {
	for _, s := range []string{"", "0", "2000000", "10mbit", "500kbit", "1gbit", "1.5mbit", "-1", "9223372037gbit", "bit"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseRate(s)
		if err != nil {
			return
		}
		if n < 0 {
			t.Fatalf("%q: negative rate %d", s, n)
		}
		if back, err := parseRate(strconv.FormatInt(n, 10)); err != nil || back != n {
			t.Fatalf("%q: parsed %d, which reads back as %d, %v", s, n, back, err)
		}
	})
}
