package certs

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// SessionKeys are the secrets several gateway instances must share so that
// each resumes the others' sessions and accepts their address-validation
// tokens and stateless resets: TLS session-ticket keys (the first encrypts,
// the rest still decrypt), and quic-go's token-generator and stateless-reset
// keys.
type SessionKeys struct {
	TicketKeys        [][32]byte `json:"ticket_keys"`
	TokenGeneratorKey [32]byte   `json:"token_generator_key"`
	StatelessResetKey [32]byte   `json:"stateless_reset_key"`
	// Rotated is when the first ticket key was made.
	Rotated time.Time `json:"rotated"`
}

// maxTicketKeys is the current key plus the previous one, kept for
// decryption so that tickets issued just before a rotation still resume.
const maxTicketKeys = 2

// LoadSessionKeys reads a file written by EnsureSessionKeys.
func LoadSessionKeys(path string) (*SessionKeys, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("session keys: %w", err)
	}
	var k SessionKeys
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&k); err != nil {
		return nil, fmt.Errorf("session keys %s: %w", path, err)
	}
	if len(k.TicketKeys) == 0 {
		return nil, fmt.Errorf("session keys %s: no ticket keys", path)
	}
	return &k, nil
}

// EnsureSessionKeys loads the keys at path, or makes and writes fresh ones
// when the file does not exist. Instances pointed at the same file share
// them.
func EnsureSessionKeys(path string) (*SessionKeys, error) {
	k, err := LoadSessionKeys(path)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		return k, err
	}
	if k, err = NewSessionKeys(time.Now()); err != nil {
		return nil, err
	}
	return k, k.Save(path)
}

// Rotate puts a fresh ticket key first and keeps the previous one for
// decryption only.
func (k *SessionKeys) Rotate(now time.Time) error {
	var fresh [32]byte
	if _, err := rand.Read(fresh[:]); err != nil {
		return err
	}
	k.TicketKeys = append([][32]byte{fresh}, k.TicketKeys...)
	if len(k.TicketKeys) > maxTicketKeys {
		k.TicketKeys = k.TicketKeys[:maxTicketKeys]
	}
	k.Rotated = now.UTC()
	return nil
}

// Save writes the keys readable by the owner only; the rename makes the
// replacement atomic for instances reading the same file.
func (k *SessionKeys) Save(path string) error {
	b, err := json.MarshalIndent(k, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("session keys: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("session keys: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("session keys: %w", err)
	}
	return nil
}

// Apply sets c's session-ticket keys.
func (k *SessionKeys) Apply(c *tls.Config) {
	c.SetSessionTicketKeys(k.TicketKeys)
}
