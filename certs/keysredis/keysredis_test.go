package keysredis

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"h3infer/certs"
	"h3infer/internal/redistest"
)

func sealKey(t *testing.T) []byte {
	t.Helper()
	k, err := EnsureSealKey(filepath.Join(t.TempDir(), "seal.key"))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func newStore(t *testing.T, rc *redis.Client, seal []byte) *Store {
	t.Helper()
	s, err := New(rc, "", seal)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestStoreSharesAndRotatesOnce(t *testing.T) {
	rc := redistest.Start(t)
	ctx := context.Background()
	seal := sealKey(t)
	a, b := newStore(t, rc, seal), newStore(t, rc, seal)
	t0 := time.Now()
	ka, err := a.Current(ctx, t0, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := b.Current(ctx, t0, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if ka.TicketKeys[0] != kb.TicketKeys[0] || ka.StatelessResetKey != kb.StatelessResetKey {
		t.Fatal("two instances got different keys from one Redis")
	}
	var wg sync.WaitGroup
	got := make([][32]byte, 8)
	for i := range got {
		wg.Go(func() {
			st := a
			if i%2 == 1 {
				st = b
			}
			k, err := st.Current(ctx, t0.Add(90*time.Minute), time.Hour)
			if err != nil {
				t.Error(err)
				return
			}
			if len(k.TicketKeys) != 2 || k.TicketKeys[1] != ka.TicketKeys[0] {
				t.Errorf("after rotation: %d keys, previous key kept: %v", len(k.TicketKeys), len(k.TicketKeys) == 2 && k.TicketKeys[1] == ka.TicketKeys[0])
			}
			got[i] = k.TicketKeys[0]
		})
	}
	wg.Wait()
	for i := range got {
		if got[i] != got[0] || got[i] == ka.TicketKeys[0] {
			t.Fatalf("instances due at once rotated more than once or not at all")
		}
	}
}

// TestStoredKeysAreSealed reads what Redis holds: none of the secrets may
// appear in it, raw or in the JSON encoding the store marshals.
func TestStoredKeysAreSealed(t *testing.T) {
	rc := redistest.Start(t)
	ctx := context.Background()
	k, err := newStore(t, rc, sealKey(t)).Current(ctx, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	stored, err := rc.Get(ctx, DefaultKey).Bytes()
	if err != nil {
		t.Fatal(err)
	}
	plain, _ := json.Marshal(k)
	secrets := [][]byte{k.TicketKeys[0][:], k.TokenGeneratorKey[:], k.StatelessResetKey[:], plain}
	for _, field := range []string{"ticket_keys", "token_generator_key", "stateless_reset_key"} {
		secrets = append(secrets, []byte(field))
	}
	for _, s := range secrets {
		if bytes.Contains(stored, s) {
			t.Fatalf("Redis holds %q in the clear: %q", s, stored)
		}
	}
	// Sealed data must not even leak a secret's JSON (base64) spelling.
	for _, key := range [][32]byte{k.TicketKeys[0], k.TokenGeneratorKey, k.StatelessResetKey} {
		enc, _ := json.Marshal(key[:])
		if bytes.Contains(stored, bytes.Trim(enc, `"`)) {
			t.Fatalf("Redis holds a key's base64 in the clear")
		}
	}
}

// TestForeignKeysRefused plays an attacker who can write Redis but has no
// seal key: keys they write in the clear, or seal with a key of their own,
// are refused, and what they wrote stays untouched (the store never
// overwrites a value it cannot open). An instance with the right seal key
// beside it keeps working once the legitimate value is back.
func TestForeignKeysRefused(t *testing.T) {
	rc := redistest.Start(t)
	ctx := context.Background()
	seal := sealKey(t)
	good := newStore(t, rc, seal)
	legit, err := good.Current(ctx, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	legitValue, _ := rc.Get(ctx, DefaultKey).Bytes()

	evil, err := certs.NewSessionKeys(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	clear, _ := json.Marshal(evil)
	otherSeal := newStore(t, redistest.Start(t), sealKey(t)) // attacker's own store and key
	if _, err := otherSeal.Current(ctx, time.Now(), time.Hour); err != nil {
		t.Fatal(err)
	}
	attackerSealed, _ := otherSeal.client.Get(ctx, DefaultKey).Bytes()
	for name, value := range map[string][]byte{
		"clear JSON":              clear,
		"sealed with another key": attackerSealed,
		"garbage":                 []byte(sealMagic + "xxxx"),
	} {
		t.Run(name, func(t *testing.T) {
			if err := rc.Set(ctx, DefaultKey, value, 0).Err(); err != nil {
				t.Fatal(err)
			}
			// Even when due for rotation, which would write the key.
			k, err := good.Current(ctx, time.Now().Add(2*time.Hour), time.Hour)
			if !errors.Is(err, ErrUnsealed) {
				t.Fatalf("Current = %v, %v; want ErrUnsealed", k, err)
			}
			if after, _ := rc.Get(ctx, DefaultKey).Bytes(); !bytes.Equal(after, value) {
				t.Fatal("the store overwrote a value it could not open")
			}
		})
	}
	if err := rc.Set(ctx, DefaultKey, legitValue, 0).Err(); err != nil {
		t.Fatal(err)
	}
	k, err := good.Current(ctx, time.Now(), time.Hour)
	if err != nil || k.TicketKeys[0] != legit.TicketKeys[0] {
		t.Fatalf("legitimate keys: %v; same as before: %v", err, err == nil && k.TicketKeys[0] == legit.TicketKeys[0])
	}
}

func TestSealKeyFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "seal.key")
	k1, err := EnsureSealKey(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("seal key file mode %v, %v; want 0600", fi.Mode().Perm(), err)
	}
	k2, err := EnsureSealKey(path)
	if err != nil || !bytes.Equal(k1, k2) {
		t.Fatalf("second EnsureSealKey: %v, same key %v", err, bytes.Equal(k1, k2))
	}
	os.Chmod(path, 0o644)
	if _, err := LoadSealKey(path); err == nil {
		t.Error("a seal key readable by others was accepted")
	}
	os.Chmod(path, 0o600)
	os.WriteFile(path, []byte("c2hvcnQ=\n"), 0o600)
	if _, err := LoadSealKey(path); err == nil {
		t.Error("a short seal key was accepted")
	}
}
