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

// RotatorConfig configures a Rotator.
type RotatorConfig struct {
	Store KeyStore
	// Every is how old the newest ticket key may grow before it is
	// replaced; the one it replaces still decrypts until the next rotation,
	// so a ticket stays valid for at least Every. Required.
	Every time.Duration
	// Check is how often the store is read, so that keys another instance
	// rotated are picked up. Default: Every/10, at most one minute.
	Check time.Duration
	// Apply installs keys in the servers. It is called only when they
	// differ from the last ones applied.
	Apply func(*SessionKeys)
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
	var errs []error
	if cfg.Store == nil {
		errs = append(errs, errors.New("session keys: store is nil"))
	}
	if cfg.Every <= 0 {
		errs = append(errs, fmt.Errorf("session keys: rotation interval must be > 0, got %s", cfg.Every))
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
	if cfg.Check == 0 {
		cfg.Check = min(cfg.Every/10, time.Minute)
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
	return r.load(ctx, now, r.cfg.Every)
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
