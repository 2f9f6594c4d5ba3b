package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// pebbleVersion is the ACME test server the test builds from the Go module
// proxy (with its DNS companion, which answers every name with 127.0.0.1
// so that the CA's validation reaches this test's listener).
const pebbleVersion = "v2.10.0"

func installPebble(t *testing.T) (pebble, challtestsrv string) {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(wd, "..", ".cache", "pebble", pebbleVersion)
	for _, cmd := range []string{"pebble", "pebble-challtestsrv"} {
		if _, err := os.Stat(filepath.Join(bin, cmd)); err == nil {
			continue
		}
		c := exec.Command("go", "install", "github.com/letsencrypt/pebble/v2/cmd/"+cmd+"@"+pebbleVersion)
		c.Env = append(os.Environ(), "GOBIN="+bin, "GOFLAGS=")
		if out, err := c.CombinedOutput(); err != nil {
			t.Fatalf("go install %s@%s: %v\n%s", cmd, pebbleVersion, err, out)
		}
	}
	return filepath.Join(bin, "pebble"), filepath.Join(bin, "pebble-challtestsrv")
}

func freePort(t *testing.T, network string) int {
	t.Helper()
	if network == "udp" {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.LocalAddr().(*net.UDPAddr).Port
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func startProcess(t *testing.T, name string, env []string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	log, err := os.Create(filepath.Join(t.TempDir(), filepath.Base(name)+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(log.Name())
			t.Logf("%s output:\n%s", filepath.Base(name), b)
		}
		log.Close()
	})
}

func TestACMEIssuesFromPebble(t *testing.T) {
	pebble, challsrv := installPebble(t)
	dir := t.TempDir()
	// Pebble's own HTTPS certificate, from a development CA.
	dev, err := EnsureDev(filepath.Join(dir, "pebble-tls"), DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	devPool, err := LoadPool(dev.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	acmePort, mgmtPort, dnsPort, tlsPort := freePort(t, "tcp"), freePort(t, "tcp"), freePort(t, "udp"), freePort(t, "tcp")
	conf, _ := json.Marshal(map[string]any{"pebble": map[string]any{
		"listenAddress":           fmt.Sprintf("127.0.0.1:%d", acmePort),
		"managementListenAddress": fmt.Sprintf("127.0.0.1:%d", mgmtPort),
		"certificate":             dev.CertFile,
		"privateKey":              dev.KeyFile,
		"httpPort":                freePort(t, "tcp"),
		"tlsPort":                 tlsPort,
	}})
	confFile := filepath.Join(dir, "pebble.json")
	if err := os.WriteFile(confFile, conf, 0o600); err != nil {
		t.Fatal(err)
	}
	dnsAddr := fmt.Sprintf("127.0.0.1:%d", dnsPort)
	startProcess(t, challsrv, nil, "-dnsserver", dnsAddr, "-http01", "", "-https01", "", "-tlsalpn01", "", "-doh", "",
		"-management", fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp")), "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "")
	startProcess(t, pebble, []string{"PEBBLE_VA_NOSLEEP=1", "PEBBLE_WFE_NONCEREJECT=0"}, "-config", confFile, "-dnsserver", dnsAddr)

	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: devPool}}}
	directory := fmt.Sprintf("https://127.0.0.1:%d/dir", acmePort)
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := hc.Get(directory)
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pebble did not answer within 30s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	const host = "gateway.h3infer.test"
	var mu sync.Mutex
	newACME := func() *ACME {
		a, err := NewACME(ACMEConfig{Hosts: []string{host}, DirectoryURL: directory, CacheDir: filepath.Join(dir, "acme"),
			Transport: finalizeLocation{&http.Transport{TLSClientConfig: &tls.Config{RootCAs: devPool}}}})
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	acme := newACME()
	// The server side: the port Pebble validates tls-alpn-01 on.
	ln, err := tls.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", tlsPort), &tls.Config{
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			mu.Lock()
			a := acme
			mu.Unlock()
			c, err := CertificateSource(a, func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
				return nil, errors.New("no fallback in this test")
			})(hello)
			if err != nil {
				t.Logf("certificate for %q: %v", hello.ServerName, err)
			}
			return c, err
		},
		NextProtos: []string{"http/1.1", ACMEALPN},
	})
	if err != nil {
		t.Fatal(err)
	}
	var serving sync.WaitGroup
	defer func() { ln.Close(); serving.Wait() }()
	serving.Go(func() {
		var conns sync.WaitGroup
		defer conns.Wait()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Go(func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(60 * time.Second))
				c.(*tls.Conn).Handshake()
			})
		}
	})

	// The first handshake for the host makes autocert order a certificate;
	// Pebble validates it through this same listener.
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	d := tls.Dialer{Config: &tls.Config{ServerName: host, InsecureSkipVerify: true}}
	var conn net.Conn
	// A failed order makes autocert wait a minute before ordering again,
	// so a retry uses a fresh manager on the same cache (as a restart
	// would).
	for attempt := 1; ; attempt++ {
		if conn, err = d.DialContext(ctx, "tcp", ln.Addr().String()); err == nil {
			break
		}
		if attempt == 5 {
			t.Fatalf("handshake for %s, %d attempts: %v", host, attempt, err)
		}
		t.Logf("handshake %d for %s: %v", attempt, host, err)
		mu.Lock()
		acme = newACME()
		mu.Unlock()
	}
	chain := conn.(*tls.Conn).ConnectionState().PeerCertificates
	conn.Close()

	resp, err := hc.Get(fmt.Sprintf("https://127.0.0.1:%d/roots/0", mgmtPort))
	if err != nil {
		t.Fatal(err)
	}
	rootPEM, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		t.Fatalf("pebble's root is not PEM: %q", rootPEM)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{DNSName: host, Roots: roots, Intermediates: inter}); err != nil {
		t.Errorf("the served certificate does not verify against Pebble's root for %s: %v", host, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "acme", host)); err != nil {
		t.Errorf("the issued certificate is not in the cache: %v", err)
	}
}

// finalizeLocation adds the Location header Pebble leaves out of its
// answer to an order's finalization ("processing"), where x/crypto/acme
// takes the order's URL from to poll it (RFC 8555 requires Location only on
// the order's creation). Pebble's order URL is its finalize URL with
// /my-order/ for /finalize-order/. Everything else passes untouched.
type finalizeLocation struct{ next http.RoundTripper }

func (f finalizeLocation) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := f.next.RoundTrip(r)
	if err != nil || resp.Header.Get("Location") != "" {
		return resp, err
	}
	if id, ok := strings.CutPrefix(r.URL.Path, "/finalize-order/"); ok {
		u := *r.URL
		u.Path = "/my-order/" + id
		resp.Header.Set("Location", u.String())
	}
	return resp, nil
}
