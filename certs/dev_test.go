package certs

import (
	"bytes"
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestEnsureDevServesVerifiedTLS(t *testing.T) {
	dir := t.TempDir()
	d, err := EnsureDev(dir, DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !d.Created {
		t.Errorf("Created = false on an empty dir")
	}
	kp, err := LoadKeyPair(d.CertFile, d.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := LoadPool(d.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{kp}})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	defer func() { ln.Close(); <-served }()

	for _, name := range []string{"127.0.0.1", "localhost", "::1"} {
		t.Run(name, func(t *testing.T) {
			c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: pool, ServerName: name})
			if err != nil {
				t.Fatalf("handshake as %s: %v", name, err)
			}
			defer c.Close()
			leaf := c.ConnectionState().PeerCertificates[0]
			if got := SPKIPin(leaf); got != d.SPKI {
				t.Errorf("SPKI of served leaf = %s, want %s", got, d.SPKI)
			}
		})
	}
	pin, err := os.ReadFile(filepath.Join(dir, SPKIFile))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(pin)); got != d.SPKI {
		t.Errorf("spki.txt = %q, want %q", got, d.SPKI)
	}
}

func TestEnsureDevReuseAndReissue(t *testing.T) {
	dir := t.TempDir()
	first, err := EnsureDev(dir, DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ca, leaf := read(CAFile), read(CertFile)

	again, err := EnsureDev(dir, DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if again.Created || !bytes.Equal(read(CAFile), ca) || !bytes.Equal(read(CertFile), leaf) || again.SPKI != first.SPKI {
		t.Errorf("second EnsureDev changed files (Created=%v)", again.Created)
	}

	named, err := EnsureDev(dir, DevOptions{Names: []string{"edge.example.test"}})
	if err != nil {
		t.Fatal(err)
	}
	if !named.Created || bytes.Equal(read(CertFile), leaf) {
		t.Errorf("a new name did not reissue the leaf")
	}
	if !bytes.Equal(read(CAFile), ca) {
		t.Errorf("a new name replaced the CA; it should only reissue the leaf")
	}
	c, err := readCert(named.CertFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range append(DefaultNames, "edge.example.test") {
		if err := c.VerifyHostname(n); err != nil {
			t.Errorf("leaf not valid for %s: %v", n, err)
		}
	}
	if ip := net.ParseIP("::1"); !c.IPAddresses[1].Equal(ip) && !c.IPAddresses[0].Equal(ip) {
		t.Errorf("leaf IPs %v lack ::1", c.IPAddresses)
	}

	forced, err := EnsureDev(dir, DevOptions{Force: true})
	if err != nil {
		t.Fatal(err)
	}
	if !forced.Created || bytes.Equal(read(CAFile), ca) {
		t.Errorf("Force did not replace the CA")
	}
	if info, err := os.Stat(filepath.Join(dir, KeyFile)); err != nil || info.Mode().Perm() != 0o600 {
		t.Errorf("key.pem mode = %v, %v; want 0600", info.Mode().Perm(), err)
	}
}

func TestEnsureDevRejectsCorruptCA(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, CAFile), []byte("not pem"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := EnsureDev(dir, DevOptions{}); err == nil {
		t.Fatal("EnsureDev accepted a corrupt ca.pem; want an error rather than a silent replacement")
	}
}
