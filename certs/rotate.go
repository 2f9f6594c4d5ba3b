package certs

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"h3infer/config"
)

// KeyStore holds the session keys that instances share. Current returns
// them, first rotating the ticket keys when the newest is older than every;
// the check and the rotation are one atomic step across instances, so two
// instances due at once rotate once, not twice.
type KeyStore interface {
	Current(ctx context.Context, now time.Time, every time.Duration) (*SessionKeys, error)
}

// FileStore keeps the keys in one file (EnsureSessionKeys' format) that
// instances on one machine or a shared volume read. An flock on a file
// beside it makes rotation atomic.
type FileStore struct{ Path string }

// Current implements KeyStore.
func (f FileStore) Current(_ context.Context, now time.Time, every time.Duration) (*SessionKeys, error) {
	if err := os.MkdirAll(filepath.Dir(f.Path), 0o700); err != nil {
		return nil, fmt.Errorf("session keys: %w", err)
	}
	lock, err := os.OpenFile(f.Path+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("session keys: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return nil, fmt.Errorf("session keys: lock %s: %w", lock.Name(), err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	k, err := EnsureSessionKeys(f.Path)
	if err != nil {
		return nil, err
	}
	if !k.Due(now, every) {
		return k, nil
	}
	if err := k.Rotate(now); err != nil {
		return nil, err
	}
	return k, k.Save(f.Path)
}

// Due reports whether the newest ticket key is older than every.
func (k *SessionKeys) Due(now time.Time, every time.Duration) bool {
	return every > 0 && !now.Before(k.Rotated.Add(every))
}

// NewSessionKeys makes a fresh set: one ticket key and the QUIC keys.
func NewSessionKeys(now time.Time) (*SessionKeys, error) {
	k := &SessionKeys{}
	for _, b := range [][]byte{k.TokenGeneratorKey[:], k.StatelessResetKey[:]} {
		if _, err := rand.Read(b); err != nil {
			return nil, fmt.Errorf("session keys: %w", err)
		}
	}
	if err := k.Rotate(now); err != nil {
		return nil, fmt.Errorf("session keys: %w", err)
	}
	return k, nil
}

// RotatorConfig configures a Rotator. Every is the configuration file's
// zero_rtt.ticket_key_rotation; the rest the caller wires.
type RotatorConfig struct {
	Store KeyStore `json:"-"`
	// Every is how old the newest ticket key may grow before it is
	// replaced; the one it replaces still decrypts until the next rotation,
	// so a ticket stays valid for at least Every. 1s..168h; default
	// DefaultRotation.
	Every config.Duration `json:"ticket_key_rotation"`
	// Check is how often the store is read, so that keys another instance
	// rotated are picked up. Default: Every/10, at most one minute.
	Check time.Duration `json:"-"`
	// Apply installs keys in the servers. It is called only when they
	// differ from the last ones applied.
	Apply func(*SessionKeys) `json:"-"`
}

// DefaultRotation is RotatorConfig.Every's default: tickets resume for
// half a day to a day.
const DefaultRotation = 12 * time.Hour

// The range RotatorConfig.Every accepts.
const (
	minRotation = time.Second
	maxRotation = 7 * 24 * time.Hour
)

// WithDefaults returns c with Every's zero value replaced by its default.
func (c RotatorConfig) WithDefaults() RotatorConfig {
	if c.Every == 0 {
		c.Every = config.Duration(DefaultRotation)
	}
	return c
}

// Validate reports a rotation out of its bounds under the configuration
// file's key. Zero stands for the default. NewRotator checks the wiring
// besides.
func (c RotatorConfig) Validate() error {
	if e := time.Duration(c.WithDefaults().Every); e < minRotation || e > maxRotation {
		return fmt.Errorf("zero_rtt.ticket_key_rotation: must be 1s..168h, got %s", e)
	}
	return nil
}

// Rotator keeps the servers' session keys current with a KeyStore.
type Rotator struct {
	cfg RotatorConfig
	log *slog.Logger

	mu   sync.Mutex // one load at a time: Run and RotateNow may overlap
	last *SessionKeys
}

// NewRotator reads the store once and applies what it holds, so the
// servers start with the shared keys.
func NewRotator(ctx context.Context, cfg RotatorConfig, log *slog.Logger) (*Rotator, *SessionKeys, error) {
	errs := []error{cfg.Validate()}
	if cfg.Store == nil {
		errs = append(errs, errors.New("session keys: store is nil"))
	}
	if cfg.Apply == nil {
		errs = append(errs, errors.New("session keys: apply is nil"))
	}
	if log == nil {
		errs = append(errs, errors.New("session keys: logger is nil"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, nil, err
	}
	cfg = cfg.WithDefaults()
	if cfg.Check == 0 {
		cfg.Check = min(time.Duration(cfg.Every)/10, time.Minute)
	}
	r := &Rotator{cfg: cfg, log: log}
	k, err := r.check(ctx, time.Now())
	if err != nil {
		return nil, nil, err
	}
	return r, k, nil
}

// Run checks the store every Check until ctx ends. A store that fails
// (Redis away, say) keeps the keys in use and is tried again.
func (r *Rotator) Run(ctx context.Context) {
	t := time.NewTicker(r.cfg.Check)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			if _, err := r.check(ctx, now); err != nil && ctx.Err() == nil {
				r.log.Warn("session keys: check failed; keeping the keys in use", "err", err)
			}
		}
	}
}

// RotateNow replaces the ticket key at once (on an operator's request, or
// in tests), whatever its age.
func (r *Rotator) RotateNow(ctx context.Context) error {
	// Any key is older than a nanosecond.
	_, err := r.load(ctx, time.Now(), time.Nanosecond)
	return err
}

func (r *Rotator) check(ctx context.Context, now time.Time) (*SessionKeys, error) {
	return r.load(ctx, now, time.Duration(r.cfg.Every))
}

func (r *Rotator) load(ctx context.Context, now time.Time, every time.Duration) (*SessionKeys, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k, err := r.cfg.Store.Current(ctx, now, every)
	if err != nil {
		return nil, err
	}
	if r.last == nil || !sameKeys(r.last, k) {
		r.cfg.Apply(k)
		r.log.Info("session keys applied", "ticket_keys", len(k.TicketKeys), "rotated", k.Rotated)
		r.last = k
	}
	return k, nil
}

func sameKeys(a, b *SessionKeys) bool {
	if len(a.TicketKeys) != len(b.TicketKeys) || a.TokenGeneratorKey != b.TokenGeneratorKey || a.StatelessResetKey != b.StatelessResetKey {
		return false
	}
	for i := range a.TicketKeys {
		if a.TicketKeys[i] != b.TicketKeys[i] {
			return false
		}
	}
	return true
}
