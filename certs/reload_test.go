package certs

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"h3infer/config"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func servedSPKI(t *testing.T, r *Reloader) string {
	t.Helper()
	c, err := r.GetCertificate(&tls.ClientHelloInfo{})
	if err != nil {
		t.Fatal(err)
	}
	return SPKIPin(c.Leaf)
}

func TestReloaderWatchesAndKeepsTheOldPairOnError(t *testing.T) {
	dir := t.TempDir()
	first, err := EnsureDev(dir, DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := NewReloader(first.CertFile, first.KeyFile, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	if got := servedSPKI(t, r); got != first.SPKI {
		t.Fatalf("serving %s, want %s", got, first.SPKI)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { r.Watch(ctx, 10*time.Millisecond) })
	defer func() { cancel(); wg.Wait() }()

	// A key that does not match the certificate is refused; the old pair
	// stays in service.
	other, err := EnsureDev(t.TempDir(), DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	key, _ := os.ReadFile(other.KeyFile)
	if err := os.WriteFile(first.KeyFile, key, 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if got := servedSPKI(t, r); got != first.SPKI {
		t.Errorf("after a mismatched key: serving %s, want the old %s", got, first.SPKI)
	}
	// The matching certificate completes the swap.
	cert, _ := os.ReadFile(other.CertFile)
	if err := os.WriteFile(first.CertFile, cert, 0o644); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for servedSPKI(t, r) != other.SPKI {
		if time.Now().After(deadline) {
			t.Fatal("the replaced pair was not picked up within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := r.SetFiles(filepath.Join(dir, "missing.pem"), first.KeyFile); err == nil {
		t.Error("SetFiles accepted a missing certificate")
	}
	if got := servedSPKI(t, r); got != other.SPKI {
		t.Errorf("after a failed SetFiles: serving %s, want %s", got, other.SPKI)
	}
}

func TestFileStoreRotatesOnceAcrossInstances(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys.json")
	st := FileStore{Path: path}
	ctx := context.Background()
	t0 := time.Now()
	a, err := st.Current(ctx, t0, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := st.Current(ctx, t0.Add(time.Minute), time.Hour); b.TicketKeys[0] != a.TicketKeys[0] {
		t.Fatal("keys rotated before they were due")
	}
	// Two instances due at once: one rotates, the other reads its result.
	var wg sync.WaitGroup
	got := make([]*SessionKeys, 2)
	for i := range got {
		wg.Go(func() {
			k, err := st.Current(ctx, t0.Add(2*time.Hour), time.Hour)
			if err != nil {
				t.Error(err)
				return
			}
			got[i] = k
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if got[0].TicketKeys[0] != got[1].TicketKeys[0] || len(got[0].TicketKeys) != 2 {
		t.Fatalf("instances disagree after one rotation: %d and %d keys", len(got[0].TicketKeys), len(got[1].TicketKeys))
	}
	if got[0].TicketKeys[0] == a.TicketKeys[0] || got[0].TicketKeys[1] != a.TicketKeys[0] {
		t.Error("after rotation the previous key is not kept second")
	}
	if got[0].StatelessResetKey != a.StatelessResetKey || got[0].TokenGeneratorKey != a.TokenGeneratorKey {
		t.Error("rotation changed the QUIC keys")
	}
}

func TestRotatorAppliesNewKeys(t *testing.T) {
	st := FileStore{Path: filepath.Join(t.TempDir(), "keys.json")}
	var mu sync.Mutex
	var applied [][32]byte
	r, k, err := NewRotator(context.Background(), RotatorConfig{Store: st, Every: config.Duration(time.Hour), Apply: func(k *SessionKeys) {
		mu.Lock()
		defer mu.Unlock()
		applied = append(applied, k.TicketKeys[0])
	}}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.RotateNow(context.Background()); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(applied) != 2 || applied[0] != k.TicketKeys[0] || applied[1] == applied[0] {
		t.Errorf("applied %d key sets, want the first and then a rotated one", len(applied))
	}
}
