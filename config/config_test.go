package config

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{
		`"800ms"`: 800 * time.Millisecond,
		`"1m30s"`: 90 * time.Second,
		`"-1s"`:   -time.Second,
		`"0s"`:    0,
	} {
		var d Duration
		if err := json.Unmarshal([]byte(in), &d); err != nil {
			t.Errorf("%s: %v", in, err)
			continue
		}
		if time.Duration(d) != want {
			t.Errorf("%s: got %s, want %s", in, d, want)
		}
		out, err := json.Marshal(d)
		if err != nil {
			t.Fatal(err)
		}
		var back Duration
		if err := json.Unmarshal(out, &back); err != nil || back != d {
			t.Errorf("%s: written as %s, read back as %s (%v)", in, out, back, err)
		}
	}
	for in, want := range map[string]string{
		`30`:     "want a duration string",
		`"30"`:   "missing unit",
		`"soon"`: "invalid duration",
	} {
		var d Duration
		if err := json.Unmarshal([]byte(in), &d); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: err %v, want one saying %q", in, err, want)
		}
	}
}
