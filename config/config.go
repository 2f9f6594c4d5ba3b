// Package config holds the types a library's settings take when they are
// read from h3infer's configuration file, for values JSON has no word
// for: a Duration written as "800ms".
//
// Each library owns its settings: its Config carries the json tags the
// file spells, its zero values are its documented defaults, and it checks
// its own values, naming each key as the file writes it. cmd/h3infer
// decodes the file straight into those structs. What they share is how a
// value is written, and that lives here, once, so that every section
// reads "800ms" the same way. The package holds spellings only: no
// defaults, no checks and nothing of any one section, which belong to the
// library that owns the setting. Like priority and infer it is a leaf:
// it imports nothing of h3infer's.
package config

import (
	"encoding/json"
	"fmt"
	"time"
)

// Duration is a time.Duration written in the file as a string that
// time.ParseDuration reads, such as "800ms" or "1m30s". Its zero value is
// zero, so a key left out keeps the zero that means its default.
type Duration time.Duration

// UnmarshalJSON reads a duration string; a number is refused, since a bare
// 30 could mean seconds or nanoseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a duration string such as \"800ms\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON writes the duration as the string UnmarshalJSON reads.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// String is time.Duration's form, "1m30s".
func (d Duration) String() string { return time.Duration(d).String() }
