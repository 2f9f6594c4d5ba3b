package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net/http"
	"testing"
	"time"

	"h3infer/config"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// slowStream opens a request stream that sends two bytes of a HEADERS
// frame and nothing more.
func slowStream(t *testing.T, qc *quic.Conn) *quic.Stream {
	t.Helper()
	str, err := qc.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := str.Write([]byte{0x01, 0x40}); err != nil {
		t.Fatal(err)
	}
	return str
}

func TestHeaderTimeoutResetsStream(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.HeaderTimeout = config.Duration(200 * time.Millisecond) })
	qc, _ := h.rawH3(t)
	str := slowStream(t, qc)
	str.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.ReadAll(str)
	se, ok := errors.AsType[*quic.StreamError](err)
	if !ok || se.ErrorCode != quic.StreamErrorCode(http3.ErrCodeRequestIncomplete) {
		t.Fatalf("slow stream ended with %v, want a reset with H3_REQUEST_INCOMPLETE", err)
	}
}

// TestPreauthStreamCap: until a request on it has authenticated, a
// connection gets PreauthStreams requests in handlers; then MaxStreams.
func TestPreauthStreamCap(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.PreauthStreams = 2
		c.MaxStreams = 20
		c.HeaderTimeout = config.Duration(time.Minute)
	})
	qc, cc := h.rawH3(t)
	get := func(ctx context.Context, bearer string) (*http.Response, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, h.base+"/v1/models", nil)
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := cc.RoundTrip(req)
		if err == nil {
			resp.Body.Close()
		}
		return resp, err
	}
	first := slowStream(t, qc)
	slowStream(t, qc)

	// Both handlers are taken: an unauthenticated request waits in quic-go.
	answered := make(chan int, 1)
	go func() {
		resp, err := get(context.Background(), "")
		if err != nil {
			answered <- -1
			return
		}
		answered <- resp.StatusCode
	}()
	select {
	case code := <-answered:
		t.Fatalf("request answered (%d) while the pre-auth cap was full", code)
	case <-time.After(200 * time.Millisecond):
	}
	first.CancelWrite(0)
	select {
	case code := <-answered:
		if code != http.StatusUnauthorized {
			t.Errorf("request without a token: %d, want 401", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("request not served after a handler freed up")
	}

	bearer := bearerOfCredential(t, h.cred)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if resp, err := get(ctx, bearer); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("authenticated request: %v %v", resp, err)
	}
	for range 10 {
		slowStream(t, qc)
	}
	// Eleven slow streams now hold handlers, far past the pre-auth cap.
	if resp, err := get(ctx, bearer); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("request after authentication, past the pre-auth cap: %v %v", resp, err)
	}
}

// TestHeaderTimeoutSparesTheBody: the deadline covers the headers only. A
// request whose headers arrive at once and whose body comes after several
// header timeouts is served, as over TCP, where ReadHeaderTimeout bounds
// the headers alone.
func TestHeaderTimeoutSparesTheBody(t *testing.T) {
	const timeout = 200 * time.Millisecond
	h := newHarness(t, func(c *Config) { c.HeaderTimeout = config.Duration(timeout) })
	body, w := io.Pipe()
	go func() {
		time.Sleep(3 * timeout)
		io.WriteString(w, `{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":false}`)
		w.Close()
	}()
	req, err := http.NewRequest(http.MethodPost, h.base+"/v1/chat/completions", body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp := h.do(t, "h3", req)
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("late body: status %d %s, want 200", resp.StatusCode, b)
	}
}

// TestAuthTimeoutClosesUnauthenticated: a connection none of whose
// requests authenticates is closed after AuthTimeout, over QUIC and over
// TCP, long before any idle timeout, while a connection that has
// authenticated outlives it.
func TestAuthTimeoutClosesUnauthenticated(t *testing.T) {
	const timeout = 300 * time.Millisecond
	h := newHarness(t, func(c *Config) { c.AuthTimeout = config.Duration(timeout) })

	idle, _ := h.rawH3(t)
	authed, ac := h.rawH3(t)
	req, err := http.NewRequest(http.MethodGet, h.base+"/v1/models", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+bearerOfCredential(t, h.cred))
	resp, err := ac.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("authenticated request: status %d", resp.StatusCode)
	}

	tcp, err := tls.Dial("tcp", h.gw.Addr(), &tls.Config{RootCAs: h.pool, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	tcp.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := tcp.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Errorf("unauthenticated TCP connection: read %v, want EOF once it is closed", err)
	}

	select {
	case <-idle.Context().Done():
	case <-time.After(10 * time.Second):
		t.Fatal("unauthenticated QUIC connection still open 10s after an auth timeout of 300ms")
	}
	if appErr, ok := errors.AsType[*quic.ApplicationError](context.Cause(idle.Context())); !ok || !appErr.Remote {
		t.Errorf("unauthenticated QUIC connection ended with %v, want the gateway's CONNECTION_CLOSE", context.Cause(idle.Context()))
	}
	if err := authed.Context().Err(); err != nil {
		t.Errorf("authenticated connection closed: %v", context.Cause(authed.Context()))
	}
	for _, ln := range []string{"quic", "tcp"} {
		if got := h.counter(t, "h3infer_connections_closed_unauthenticated_total", ln); got != 1 {
			t.Errorf("closed unauthenticated %s = %v, want 1", ln, got)
		}
	}
}

// TestStartAfterShutdownRefused: the HTTP/3 loop's contexts end with the
// first Shutdown, so a second Start is refused rather than serving a dead
// loop.
func TestStartAfterShutdownRefused(t *testing.T) {
	h := newHarness(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.gw.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.gw.Start(); err == nil {
		t.Fatal("Start after Shutdown succeeded")
	}
}
