package tokenize

import (
	"strings"
	"testing"
)

// streamAll pushes chunks and returns what was emitted per push, the
// flushed tail, and whether a stop string ended the stream.
func streamAll(stops []string, chunks ...string) (outs []string, tail string, stopped bool) {
	ts := NewStream(stops)
	for _, c := range chunks {
		out, stop := ts.Push(c)
		outs = append(outs, out)
		if stop {
			return outs, "", true
		}
	}
	return outs, ts.Flush(), false
}

func TestTextStream(t *testing.T) {
	tests := map[string]struct {
		stops    []string
		chunks   []string
		wantOuts []string
		wantTail string
		wantStop bool
	}{
		"plain": {
			chunks: []string{"ab", "c"}, wantOuts: []string{"ab", "c"},
		},
		"split character held": {
			chunks:   []string{"a\xc3", "\xa9b"},
			wantOuts: []string{"a", "éb"},
		},
		"four-byte character in pieces": {
			chunks:   []string{"\xf0", "\x9f", "\x99", "\x82!"},
			wantOuts: []string{"", "", "", "🙂!"},
		},
		"invalid byte replaced": {
			chunks: []string{"a\xffb"}, wantOuts: []string{"a\uFFFDb"},
		},
		"unfinished character at the end": {
			chunks: []string{"a\xe4\xb8"}, wantOuts: []string{"a"}, wantTail: "\uFFFD",
		},
		"stop in one token": {
			stops: []string{"END"}, chunks: []string{"abcENDxyz"},
			wantOuts: []string{"abc"}, wantStop: true,
		},
		"stop across tokens held back": {
			stops: []string{"END"}, chunks: []string{"ab", "cE", "N", "Dx"},
			wantOuts: []string{"ab", "c", "", ""}, wantStop: true,
		},
		"possible stop released": {
			stops: []string{"END"}, chunks: []string{"aE", "N", "x"},
			wantOuts: []string{"a", "", "ENx"},
		},
		"held text flushed at the end": {
			stops: []string{"END"}, chunks: []string{"aEN"},
			wantOuts: []string{"a"}, wantTail: "EN",
		},
		"earliest of two stops": {
			stops: []string{"yz", "b"}, chunks: []string{"abyz"},
			wantOuts: []string{"a"}, wantStop: true,
		},
		"stop overlapping its own prefix": {
			stops: []string{"aab"}, chunks: []string{"a", "a", "a", "b"},
			wantOuts: []string{"", "", "a", ""}, wantStop: true,
		},
		"multibyte stop": {
			stops: []string{"世界"}, chunks: []string{"hi 世", "界!"},
			wantOuts: []string{"hi ", ""}, wantStop: true,
		},
		"empty stop ignored": {
			stops: []string{""}, chunks: []string{"ab"}, wantOuts: []string{"ab"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			outs, tail, stopped := streamAll(tc.stops, tc.chunks...)
			if strings.Join(outs, "|") != strings.Join(tc.wantOuts, "|") || tail != tc.wantTail || stopped != tc.wantStop {
				t.Errorf("got outs %q tail %q stop %v, want %q %q %v", outs, tail, stopped, tc.wantOuts, tc.wantTail, tc.wantStop)
			}
		})
	}
}

func FuzzTextStreamStops(f *testing.F) {
	f.Add("hello END world", "END", uint8(3))
	f.Add("aaab", "aab", uint8(1))
	f.Add("héllo wörld", "ö", uint8(2))
	f.Fuzz(func(t *testing.T, text, stop string, step uint8) {
		n := int(step%7) + 1
		var chunks []string
		for i := 0; i < len(text); i += n {
			chunks = append(chunks, text[i:min(i+n, len(text))])
		}
		outs, tail, stopped := streamAll([]string{stop}, chunks...)
		got := strings.Join(outs, "") + tail
		want := strings.ToValidUTF8(text, "\uFFFD")
		if i := strings.Index(want, stop); stop != "" && i >= 0 {
			want = want[:i]
		}
		// Replacement of invalid bytes may happen at chunk edges either
		// way; compare only texts that are valid UTF-8 throughout.
		if !strings.Contains(text, "\uFFFD") && strings.ToValidUTF8(text, "\uFFFD") == text && strings.ToValidUTF8(stop, "") == stop {
			if got != want {
				t.Fatalf("text %q stop %q chunks %q: got %q, want %q", text, stop, chunks, got, want)
			}
			if stopped != (stop != "" && strings.Contains(text, stop)) {
				t.Fatalf("text %q stop %q: stopped = %v", text, stop, stopped)
			}
		}
	})
}
