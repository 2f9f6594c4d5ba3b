//go:build !race

// These tests resume in 0-RTT in the test process; see the note in
// gateway/zerortt_test.go on why they run without the race detector.

package client

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// quicServer is a QUIC listener on loopback that accepts 0-RTT and
// answers every stream with "ok".
type quicServer struct {
	addr string
	pool *x509.CertPool
}

func startQUICServer(t *testing.T) *quicServer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "localhost"},
		DNSNames: []string{"localhost"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	ln, err := quic.ListenAddrEarly("127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		NextProtos:   []string{"test"},
	}, &quic.Config{Allow0RTT: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept(ctx)
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				str, err := c.AcceptStream(ctx)
				if err != nil {
					return
				}
				var buf [64]byte
				str.Read(buf[:])
				str.Write([]byte("ok"))
				str.Close()
				// Keep the connection until the client closes it, so the
				// ticket, sent after the handshake, gets out.
				<-c.Context().Done()
			}()
		}
	}()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		wg.Wait()
	})
	return &quicServer{addr: ln.Addr().String(), pool: pool}
}

// roundTrip dials with cache and sends one stream in 0-RTT where the
// ticket allows, waits for the next ticket and reports whether the server
// took the early data.
func (s *quicServer) roundTrip(t *testing.T, cache *SessionCache) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	gen := cache.Generation()
	conf := &tls.Config{RootCAs: s.pool, ServerName: "localhost", NextProtos: []string{"test"}, ClientSessionCache: cache}
	c, err := quic.DialAddrEarly(ctx, s.addr, conf, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseWithError(0, "")
	str, err := c.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	str.Write([]byte("hi"))
	str.Close()
	var buf [8]byte
	n, _ := str.Read(buf[:])
	if string(buf[:n]) != "ok" {
		t.Fatalf("server answered %q", buf[:n])
	}
	<-c.HandshakeComplete()
	if !cache.WaitNewer(ctx, gen, 10*time.Second) {
		t.Fatal("no session ticket within 10s")
	}
	return c.ConnectionState().Used0RTT
}

// A cache opened anew from the file, as a new process does, resumes in
// 0-RTT: the state quic-go stores, the server's transport parameters
// included, survives the file.
func TestSessionCacheFileCarries0RTT(t *testing.T) {
	s := startQUICServer(t)
	path := filepath.Join(t.TempDir(), "sub", "sessions.json")
	if s.roundTrip(t, OpenSessionCache(path, 0, nil)) {
		t.Fatal("first connection, without a ticket, used 0-RTT")
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	if !s.roundTrip(t, OpenSessionCache(path, 0, nil)) {
		t.Fatal("a cache reopened from the file did not resume in 0-RTT")
	}
	// That run kept the server's next ticket, so the one after is early too.
	if !s.roundTrip(t, OpenSessionCache(path, 0, nil)) {
		t.Fatal("the next ticket, kept by the second run, did not carry 0-RTT")
	}
}

// A ticket handed out once no longer offers early data from the file: the
// gateway lets a ticket carry 0-RTT once.
func TestSessionCacheSpendsEarlyData(t *testing.T) {
	s := startQUICServer(t)
	path := filepath.Join(t.TempDir(), "sessions.json")
	s.roundTrip(t, OpenSessionCache(path, 0, nil))
	c := OpenSessionCache(path, 0, nil)
	key := entryKeys(t, path)[0]
	cs, ok := c.Get(key)
	if !ok || !earlyData(t, cs) {
		t.Fatal("stored ticket does not offer 0-RTT")
	}
	cs, ok = OpenSessionCache(path, 0, nil).Get(key)
	if !ok {
		t.Fatal("spent ticket was dropped; it should still resume")
	}
	if earlyData(t, cs) {
		t.Error("ticket still offers 0-RTT after it was handed out")
	}
}

func earlyData(t *testing.T, cs *tls.ClientSessionState) bool {
	t.Helper()
	_, st, err := cs.ResumptionState()
	if err != nil {
		t.Fatal(err)
	}
	return st.EarlyData
}

func entryKeys(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var f sessionFile
	if err := json.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, e := range f.Entries {
		keys = append(keys, e.Key)
	}
	return keys
}

func TestSessionCacheBounded(t *testing.T) {
	s := startQUICServer(t)
	path := filepath.Join(t.TempDir(), "sessions.json")
	c := OpenSessionCache(path, 3, nil)
	s.roundTrip(t, c)
	cs, ok := c.Get(entryKeys(t, path)[0])
	if !ok {
		t.Fatal("no ticket")
	}
	for i := range 10 {
		c.Put(fmt.Sprintf("host%d:443", i), cs)
	}
	want := []string{"host7:443", "host8:443", "host9:443"}
	if got := entryKeys(t, path); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("file holds %v, want the newest three %v", got, want)
	}
	c.Put("host8:443", nil)
	if got := entryKeys(t, path); strings.Join(got, ",") != "host7:443,host9:443" {
		t.Errorf("after removing host8 the file holds %v", got)
	}
}

// A corrupt file is logged and ignored; the next ticket replaces it.
func TestSessionCacheCorruptFile(t *testing.T) {
	s := startQUICServer(t)
	dir := t.TempDir()
	for name, content := range map[string]string{
		"garbage":     "not json at all \x00\x01",
		"truncated":   `{"version": 1, "entries": [{"key": "a"`,
		"bad-state":   `{"version": 1, "entries": [{"key": "localhost", "ticket": "AAAA", "state": "AAAA", "saved": "` + time.Now().Format(time.RFC3339) + `"}]}`,
		"new-version": `{"version": 99, "entries": []}`,
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, name+".json")
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			c := OpenSessionCache(path, 0, slog.New(slog.NewTextHandler(&logs, nil)))
			if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), path) {
				t.Errorf("no warning naming the file: %q", logs.String())
			}
			if _, ok := c.Get("localhost"); ok {
				t.Error("Get found a session in a corrupt file")
			}
			if s.roundTrip(t, c) {
				t.Error("0-RTT from a corrupt file")
			}
			if len(entryKeys(t, path)) != 1 {
				t.Error("the new ticket did not replace the corrupt file")
			}
		})
	}
}

// An unreadable location costs resumption, never the request.
func TestSessionCacheUnwritable(t *testing.T) {
	s := startQUICServer(t)
	blocker := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(blocker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	c := OpenSessionCache(filepath.Join(blocker, "sessions.json"), 0, slog.New(slog.NewTextHandler(&logs, nil)))
	s.roundTrip(t, c)
	if !strings.Contains(logs.String(), "session cache not saved") {
		t.Errorf("no warning that the cache was not saved: %q", logs.String())
	}
	// The tickets are still kept in memory for this process.
	if !s.roundTrip(t, c) {
		t.Error("in-memory ticket did not carry 0-RTT")
	}
}
