package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"h3infer/certs"
)

// serverConfig writes a config file for startServer.
func serverConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// h3TLS is the TLS config of a raw HTTP/3 client of s.
func (s *server) h3TLS(t testing.TB) *tls.Config {
	t.Helper()
	pool, err := certs.LoadPool(s.caFile)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{RootCAs: pool, NextProtos: []string{http3.NextProtoH3}}
}

// sample is one metric sample with exactly these labels, as /metrics
// prints them (e.g. `listener="quic",reason="source"`).
func sample(t testing.TB, s *server, name, labels string) float64 {
	t.Helper()
	resp, err := http.Get(s.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	prefix := name + "{" + labels + "} "
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatalf("no sample %s%s", name, prefix[len(name):])
	return 0
}

// stableGoroutines waits until go_goroutines reads the same twice in a row
// and returns it.
func stableGoroutines(t *testing.T, s *server) float64 {
	t.Helper()
	last := metric(t, s, "go_goroutines")
	pollUntil(t, "go_goroutines to settle", 10*time.Second, func() bool {
		time.Sleep(100 * time.Millisecond)
		now := metric(t, s, "go_goroutines")
		settled := now == last
		last = now
		return settled
	})
	return last
}

// TestEndToEndStreamFloodIsBounded reproduces the slow-headers attack: ten
// unauthenticated connections open every stream they are granted and send
// two bytes of a HEADERS frame on each. The gateway keeps at most
// preauth_streams of them per connection in handlers (the rest wait in
// quic-go without a goroutine), resets each at the header timeout, and
// ends with the goroutines it had before, while the attackers still hold
// their connections. A legitimate client on its own connection completes
// its requests throughout.
func TestEndToEndStreamFloodIsBounded(t *testing.T) {
	const (
		conns      = 10
		maxStreams = 100
		preauth    = 20
	)
	s := startServer(t, "--config", serverConfig(t, fmt.Sprintf(
		`{"gateway": {"header_timeout": "500ms", "max_streams": %d, "preauth_streams": %d}}`, maxStreams, preauth)))
	legit := s.h3Client(t)
	chat := func() error {
		o := readStreamEnd(postJSON(t, context.Background(), legit, s.base+"/v1/chat/completions", chatBody(8, true)))
		if !o.complete {
			return fmt.Errorf("completion ended %+v", o)
		}
		return nil
	}
	if err := chat(); err != nil {
		t.Fatalf("warm-up: %v", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	host := strings.TrimPrefix(s.base, "https://")
	tlsConf := s.h3TLS(t)
	attackers := make([]*quic.Conn, conns)
	for i := range attackers {
		qc, err := quic.DialAddr(ctx, host, tlsConf, nil)
		if err != nil {
			t.Fatalf("attacker %d: %v", i, err)
		}
		t.Cleanup(func() { qc.CloseWithError(0, "") })
		attackers[i] = qc
	}
	base := stableGoroutines(t, s)

	// Sample the gateway's goroutines from the first stream on.
	var peak atomic.Int64
	stop := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Go(func() {
		for {
			peak.Store(max(peak.Load(), int64(metric(t, s, "go_goroutines"))))
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	})
	opened := 0
	for _, qc := range attackers {
		for {
			str, err := qc.OpenStream()
			if err != nil {
				if !errors.Is(err, &quic.StreamLimitReachedError{}) {
					t.Fatalf("open stream: %v", err)
				}
				break
			}
			// A HEADERS frame (type 0x01) whose two-byte length never comes.
			if _, err := str.Write([]byte{0x01, 0x40}); err != nil {
				t.Fatalf("write: %v", err)
			}
			opened++
		}
	}
	if opened != conns*maxStreams {
		t.Fatalf("attackers opened %d streams, want the %d granted", opened, conns*maxStreams)
	}

	// The legitimate client is served while the attack runs.
	for i := range 3 {
		if err := chat(); err != nil {
			t.Errorf("legitimate request %d during the attack: %v", i, err)
		}
	}
	pollUntil(t, fmt.Sprintf("goroutines back to the %v before the attack", base), 20*time.Second, func() bool {
		return metric(t, s, "go_goroutines") <= base+2
	})
	close(stop)
	sampler.Wait()

	rise := float64(peak.Load()) - base
	t.Logf("%d slow streams on %d connections: goroutines %v before, peak +%v", opened, conns, base, rise)
	if rise < conns*preauth/2 {
		t.Errorf("goroutines rose by %v at most; the attack did not reach the handlers (want about %d)", rise, conns*preauth)
	}
	if bound := float64(conns*preauth + 50); rise > bound {
		t.Errorf("goroutines rose by %v, want at most %v (connections x preauth_streams and a margin)", rise, bound)
	}
	for i, qc := range attackers {
		if qc.Context().Err() != nil {
			t.Errorf("attacker %d's connection was closed; only its streams should have been reset", i)
		}
	}
	if err := chat(); err != nil {
		t.Errorf("legitimate request after the attack: %v", err)
	}
}

// refusedConn reports whether err is the gateway refusing a connection:
// before the handshake (CONNECTION_REFUSED) or, when its source reached
// the limit while the handshake ran, after it (H3_EXCESSIVE_LOAD).
func refusedConn(err error) bool {
	if te, ok := errors.AsType[*quic.TransportError](err); ok {
		return te.ErrorCode == quic.ConnectionRefused
	}
	if ae, ok := errors.AsType[*quic.ApplicationError](err); ok {
		return ae.ErrorCode == quic.ApplicationErrorCode(http3.ErrCodeExcessiveLoad)
	}
	return false
}

// dialRefused dials and reports whether the gateway refused the
// connection, waiting briefly for a refusal after the handshake.
func dialRefused(t *testing.T, dial func() (*quic.Conn, error)) (*quic.Conn, bool) {
	t.Helper()
	qc, err := dial()
	if err != nil {
		if !refusedConn(err) {
			t.Fatalf("dial failed for another reason than a refusal: %v", err)
		}
		return nil, true
	}
	select {
	case <-qc.Context().Done():
		err := context.Cause(qc.Context())
		if !refusedConn(err) {
			t.Fatalf("connection closed for another reason than a refusal: %v", err)
		}
		return nil, true
	case <-time.After(300 * time.Millisecond):
		return qc, false
	}
}

// TestEndToEndConnectionsPerSource: a source at
// gateway.max_connections_per_source is refused more connections, over
// QUIC and TCP alike, and the refusals are counted; a client from another
// address still gets in, and the source gets in again once it closes one.
func TestEndToEndConnectionsPerSource(t *testing.T) {
	const perSource = 3
	s := startServer(t, "--config", serverConfig(t, fmt.Sprintf(`{"gateway": {"max_connections_per_source": %d}}`, perSource)))
	host := strings.TrimPrefix(s.base, "https://")
	tlsConf := s.h3TLS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dial := func() (*quic.Conn, error) { return quic.DialAddr(ctx, host, tlsConf, nil) }

	var held []*quic.Conn
	for i := range perSource {
		qc, refused := dialRefused(t, dial)
		if refused {
			t.Fatalf("connection %d of %d allowed was refused", i+1, perSource)
		}
		t.Cleanup(func() { qc.CloseWithError(0, "") })
		held = append(held, qc)
	}
	if _, refused := dialRefused(t, dial); !refused {
		t.Fatalf("connection %d from one source was not refused", perSource+1)
	}
	if n := sample(t, s, "h3infer_connections_refused_total", `listener="quic",reason="source"`); n < 1 {
		t.Errorf("quic source refusals counted %v, want at least 1", n)
	}

	// TCP shares the limit.
	h2 := s.h2Client(t)
	if resp, err := h2.Get(s.base + "/v1/models"); err == nil {
		resp.Body.Close()
		t.Errorf("a TCP connection from the full source was served (%s)", resp.Status)
	}
	if n := sample(t, s, "h3infer_connections_refused_total", `listener="tcp",reason="source"`); n < 1 {
		t.Errorf("tcp source refusals counted %v, want at least 1", n)
	}

	// Another source is served: 127.0.0.2, on the same loopback.
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)})
	if err != nil {
		t.Fatal(err)
	}
	other := &quic.Transport{Conn: udp}
	defer other.Close()
	tr := &http3.Transport{
		TLSClientConfig: tlsConf,
		Dial: func(ctx context.Context, addr string, tc *tls.Config, qc *quic.Config) (*quic.Conn, error) {
			ua, err := net.ResolveUDPAddr("udp", addr)
			if err != nil {
				return nil, err
			}
			return other.DialEarly(ctx, ua, tc, qc)
		},
	}
	defer tr.Close()
	resp, err := (&http.Client{Transport: s.withBearer(t, tr), Timeout: 30 * time.Second}).Get(s.base + "/v1/models")
	if err != nil {
		t.Fatalf("client from 127.0.0.2: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("client from 127.0.0.2: %s, want 200", resp.Status)
	}

	// Closing one connection frees its place.
	held[0].CloseWithError(0, "")
	pollUntil(t, "a new connection from the source once one closed", 10*time.Second, func() bool {
		qc, refused := dialRefused(t, dial)
		if !refused {
			qc.CloseWithError(0, "")
		}
		return !refused
	})
}
