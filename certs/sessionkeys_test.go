package certs

import (
	"crypto/tls"
	"path/filepath"
	"testing"
	"time"
)

func TestSessionKeysSharedAndRotated(t *testing.T) {
	path := filepath.Join(t.TempDir(), "session-keys.json")
	a, err := EnsureSessionKeys(path)
	if err != nil {
		t.Fatal(err)
	}
	b, err := EnsureSessionKeys(path)
	if err != nil {
		t.Fatal(err)
	}
	if a.TicketKeys[0] != b.TicketKeys[0] || a.TokenGeneratorKey != b.TokenGeneratorKey || a.StatelessResetKey != b.StatelessResetKey {
		t.Fatal("a second instance reading the same file got different keys")
	}
	old := a.TicketKeys[0]
	for range 3 {
		if err := a.Rotate(time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	if len(a.TicketKeys) != 2 || a.TicketKeys[0] == old {
		t.Errorf("after rotations: %d keys, want the current and the previous", len(a.TicketKeys))
	}
	a.Apply(&tls.Config{}) // must not panic with two keys
}
