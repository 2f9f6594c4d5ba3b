package priority

import (
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	tests := map[string]struct {
		header []string
		want   Signal
	}{
		"absent":                {nil, Signal{Urgency: 3}},
		"urgent":                {[]string{"u=0"}, Signal{Urgency: 0, HasUrgency: true}},
		"incremental bare":      {[]string{"u=5, i"}, Signal{Urgency: 5, Incremental: true, HasUrgency: true, HasIncremental: true}},
		"incremental true":      {[]string{"i=?1,u=6"}, Signal{Urgency: 6, Incremental: true, HasUrgency: true, HasIncremental: true}},
		"incremental false":     {[]string{"i, i=?0"}, Signal{Urgency: 3, HasIncremental: true}},
		"out of range ignored":  {[]string{"u=9"}, Signal{Urgency: 3}},
		"negative ignored":      {[]string{"u=-1"}, Signal{Urgency: 3}},
		"not a number":          {[]string{"u=x"}, Signal{Urgency: 3}},
		"leading zeros":         {[]string{"u=07"}, Signal{Urgency: 7, HasUrgency: true}},
		"decimal ignored":       {[]string{"u=1.0"}, Signal{Urgency: 3}},
		"last wins":             {[]string{"u=1", "u=5"}, Signal{Urgency: 5, HasUrgency: true}},
		"parameters ignored":    {[]string{"u=2;foo=bar, i;x"}, Signal{Urgency: 2, Incremental: true, HasUrgency: true, HasIncremental: true}},
		"unknown keys ignored":  {[]string{"x=1, u=4, y"}, Signal{Urgency: 4, HasUrgency: true}},
		"whitespace tolerated":  {[]string{"  u=1 ,\ti  "}, Signal{Urgency: 1, Incremental: true, HasUrgency: true, HasIncremental: true}},
		"i with a token value":  {[]string{"i=yes"}, Signal{Urgency: 3}},
		"u without a value":     {[]string{"u"}, Signal{Urgency: 3}},
		"empty members skipped": {[]string{",,u=6,,"}, Signal{Urgency: 6, HasUrgency: true}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := Parse(tc.header); got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// FuzzParse checks that any header value parses to a valid
// priority, and that what it parsed survives a round trip through String.
// Seeds: the cases above plus testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"", "u=0", "u=7, i", "i=?0", "u=3;a=b", "u=99", "u=-0", "u=1,u=2,i", "\x00u=1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		p := Parse(strings.Split(v, "\n"))
		if !p.Urgency.Valid() {
			t.Fatalf("%q: urgency %d out of range", v, p.Urgency)
		}
		if !p.HasUrgency && p.Urgency != Default {
			t.Fatalf("%q: no urgency named but got %d", v, p.Urgency)
		}
		back := Parse([]string{p.String()})
		if back.Urgency != p.Urgency || back.Incremental != p.Incremental || !back.HasUrgency {
			t.Fatalf("%q: parsed %+v, its String %q parses to %+v", v, p, p.String(), back)
		}
	})
}

func TestClasses(t *testing.T) {
	tests := map[string]struct {
		c    Classes
		want [Levels]Class
	}{
		"default":         {Classes{}, [Levels]Class{Urgent, Urgent, Urgent, Normal, Normal, Normal, Bulk, Bulk}},
		"only u=0 urgent": {Classes{UrgentMax: 0, BulkMin: 7}, [Levels]Class{Urgent, Normal, Normal, Normal, Normal, Normal, Normal, Bulk}},
		"no normal":       {Classes{UrgentMax: 3, BulkMin: 4}, [Levels]Class{Urgent, Urgent, Urgent, Urgent, Bulk, Bulk, Bulk, Bulk}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			c := tc.c.OrDefault()
			if errs := c.Validate("priority"); errs != nil {
				t.Fatalf("valid classes refused: %v", errs)
			}
			for u := range Urgency(Levels) {
				if got := c.Of(u); got != tc.want[u] {
					t.Errorf("u=%d: got %v, want %v", u, got, tc.want[u])
				}
			}
		})
	}
}

func TestClassesValidate(t *testing.T) {
	tests := map[string]struct {
		c    Classes
		want []string
	}{
		"bulk below urgent":   {Classes{UrgentMax: 5, BulkMin: 4}, []string{"priority.bulk_min"}},
		"bulk equal urgent":   {Classes{UrgentMax: 0, BulkMin: 0}, []string{"priority.bulk_min"}},
		"urgent out of range": {Classes{UrgentMax: 9, BulkMin: 10}, []string{"priority.urgent_max", "priority.bulk_min"}},
		"bulk out of range":   {Classes{UrgentMax: 2, BulkMin: 8}, []string{"priority.bulk_min"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			errs := tc.c.Validate("priority")
			if len(errs) != len(tc.want) {
				t.Fatalf("got %v, want errors naming %v", errs, tc.want)
			}
			for i, key := range tc.want {
				if !strings.HasPrefix(errs[i].Error(), key+":") {
					t.Errorf("got %q, want it to name %s", errs[i], key)
				}
			}
		})
	}
}
