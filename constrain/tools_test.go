package constrain

import (
	"errors"
	"testing"
)

// TestCalls checks that a calls grammar accepts exactly a call's opening,
// arguments its function's schema accepts, and its closing, for each of
// its functions.
func TestCalls(t *testing.T) {
	g, err := Calls([]Call{
		{Prefix: "<c>f:", Parameters: []byte(`{"type":"object","properties":{"n":{"type":"integer"}},"required":["n"],"additionalProperties":false}`), Suffix: "</c>"},
		{Prefix: "<c>g:", Suffix: "</c>"},
	})
	if err != nil {
		t.Fatal(err)
	}
	for text, want := range map[string]string{
		`<c>f:{"n":12}</c>`: "complete",
		`<c>g:{}</c>`:       "complete",
		`<c>f:{"n":12}`:     "prefix",
		`<c>`:               "prefix",
		`<c>g:{"n":1}</c>`:  "dead",
		`<c>f:{}</c>`:       "dead",
		`<c>f:{"n":1.5}`:    "dead",
		`x`:                 "dead",
	} {
		if got := stateName(g.Advance(g.Start(), text)); got != want {
			t.Errorf("%q: %s, want %s", text, got, want)
		}
	}
}

// stateName says what the text a state has read is: "dead" (no prefix
// of a document), "complete" or "prefix".
func stateName(s State) string {
	switch {
	case s.Dead():
		return "dead"
	case s.Complete():
		return "complete"
	}
	return "prefix"
}

func TestCheckParameters(t *testing.T) {
	for raw, wantPath := range map[string]string{
		``:     "",
		`null`: "",
		`{"type":"object","properties":{"a":{"type":"string"}},"required":["a"]}`:               "",
		`{"type":"object","properties":{"a":{"type":"string","pattern":"x"}},"required":["a"]}`: "p.properties.a",
		`{"type":"string"}`: "p",
		`[1]`:               "p",
	} {
		err := CheckParameters([]byte(raw), "p")
		var fe *FormatError
		switch {
		case wantPath == "" && err != nil:
			t.Errorf("%s: %v", raw, err)
		case wantPath != "" && (!errors.As(err, &fe) || fe.Path != wantPath):
			t.Errorf("%s: got %v, want an error at %s", raw, err, wantPath)
		}
	}
}
