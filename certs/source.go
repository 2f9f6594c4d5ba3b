package certs

import (
	"errors"
	"fmt"
	"time"

	"h3infer/config"
)

// SourceConfig says where the certificates served come from, as the
// configuration file's tls section writes it: a key pair from files,
// watched by a Reloader, and ACME for public names. Zero values mean the
// documented defaults (WithDefaults).
type SourceConfig struct {
	// CertFile and KeyFile name a PEM certificate chain and its key, both
	// or neither. Neither: the caller serves a development leaf
	// (EnsureDev).
	CertFile string `json:"cert_file"`
	KeyFile  string `json:"key_file"`
	// WatchInterval is how often the files are checked for changes
	// (Reloader.Watch). MinWatchInterval..MaxWatchInterval; default
	// DefaultWatchInterval.
	WatchInterval config.Duration `json:"watch_interval"`
	// ACME obtains certificates for public names; other names keep the
	// pair above. No hosts: off.
	ACME ACMEConfig `json:"acme"`
}

// DefaultWatchInterval is SourceConfig.WatchInterval's default.
const DefaultWatchInterval = 5 * time.Second

// The range SourceConfig.WatchInterval accepts.
const (
	MinWatchInterval = 10 * time.Millisecond
	MaxWatchInterval = time.Hour
)

// WithDefaults returns c with every zero value that has a default of its
// own replaced by it. ACME.CacheDir has none: where to keep state is the
// caller's to say.
func (c SourceConfig) WithDefaults() SourceConfig {
	if c.WatchInterval == 0 {
		c.WatchInterval = config.Duration(DefaultWatchInterval)
	}
	return c
}

// Validate reports every problem with c at once, each naming its key as
// the configuration file writes it. Zero values stand for their defaults.
func (c SourceConfig) Validate() error {
	c = c.WithDefaults()
	var errs []error
	if (c.CertFile == "") != (c.KeyFile == "") {
		errs = append(errs, fmt.Errorf("tls: cert_file and key_file go together, got cert_file=%q key_file=%q", c.CertFile, c.KeyFile))
	}
	if w := time.Duration(c.WatchInterval); w < MinWatchInterval || w > MaxWatchInterval {
		errs = append(errs, fmt.Errorf("tls.watch_interval: must be 10ms..1h, got %s", w))
	}
	errs = append(errs, c.ACME.Validate())
	return errors.Join(errs...)
}
