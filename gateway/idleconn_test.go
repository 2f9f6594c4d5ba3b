package gateway

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/scheduler"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// TestIdleEviction: above gateway.max_idle_connections the connections
// idle longest are closed with a clean CONNECTION_CLOSE (H3_NO_ERROR),
// those whose requests never authenticated first; a connection with a
// running stream is never closed, and is filed as idle once its stream
// ends.
func TestIdleEviction(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxIdleConnections = 2 })
	// Streams never end on their own: the one below runs until cancelled.
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return tokens("a"), nil })
	bearer := bearerOfCredential(t, h.cred)

	get := func(cc *http3.ClientConn, bearer string, want int) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, h.base+"/v1/models", nil)
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("GET /v1/models: %d, want %d", resp.StatusCode, want)
		}
	}
	// A clean close arrives at once from the gateway; a connection that
	// merely timed out would end only after quic-go's 30 s idle timeout.
	closedCleanly := func(name string, qc *quic.Conn) {
		t.Helper()
		select {
		case <-qc.Context().Done():
		case <-time.After(5 * time.Second):
			t.Fatalf("%s still open, want it evicted", name)
		}
		appErr, ok := errors.AsType[*quic.ApplicationError](context.Cause(qc.Context()))
		if !ok || !appErr.Remote || appErr.ErrorCode != quic.ApplicationErrorCode(http3.ErrCodeNoError) {
			t.Errorf("%s ended with %v, want the gateway's CONNECTION_CLOSE with H3_NO_ERROR", name, context.Cause(qc.Context()))
		}
	}
	open := func(name string, qcs ...*quic.Conn) {
		t.Helper()
		time.Sleep(100 * time.Millisecond) // a close would have arrived
		for i, qc := range qcs {
			if qc.Context().Err() != nil {
				t.Errorf("%s[%d] closed: %v", name, i, context.Cause(qc.Context()))
			}
		}
	}

	busy, busyCC := h.rawH3(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, h.base+"/v1/chat/completions",
		strings.NewReader(`{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("Authorization", "Bearer "+bearer)
	req.Header.Set("Content-Type", "application/json")
	resp, err := busyCC.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("stream: status %d", resp.StatusCode)
	}
	if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil {
		t.Fatalf("stream: first event: %v", err)
	}

	var idle [3]*quic.Conn
	for i := range idle {
		qc, cc := h.rawH3(t)
		get(cc, bearer, http.StatusOK)
		idle[i] = qc
	}
	// Three authenticated connections idle, one running a stream: the
	// oldest idle one goes.
	closedCleanly("longest idle", idle[0])
	open("younger idle or busy", idle[1], idle[2], busy)

	// Requests that fail auth do not make a connection fresh: it goes
	// before older authenticated ones.
	unauthed, cc := h.rawH3(t)
	get(cc, "", http.StatusUnauthorized)
	closedCleanly("unauthenticated", unauthed)
	open("authenticated idle or busy", idle[1], idle[2], busy)

	// A connection that has sent nothing yet is not idle in this sense: a
	// newcomer is not closed before its first request.
	fresh, _ := h.rawH3(t)
	open("fresh", fresh)

	// The stream ends: its connection is the youngest idle one now, and
	// the longest idle goes.
	cancel()
	resp.Body.Close()
	closedCleanly("longest idle after the stream ended", idle[1])
	open("younger idle", idle[2], busy, fresh)

	if got := h.counter(t, "h3infer_connections_evicted_idle_total", ""); got != 3 {
		t.Errorf("h3infer_connections_evicted_idle_total = %v, want 3", got)
	}
}
