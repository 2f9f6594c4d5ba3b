//go:build !race

package gateway

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"h3infer/client"
	"h3infer/config"
	"h3infer/internal/udprelay"
	"h3infer/tlsbind"
)

// These tests run a 0-RTT client in the test process. quic-go's client
// reads its peer's transport parameters when it opens a stream while the
// handshake writes them (quic-go issue 4303, open upstream), which the race
// detector reports; `make test` therefore runs them in a pass without it.

// holdHandshake is how long the relays here hold back Handshake packets,
// so that the gateway handles the request before the handshake completes.
// zeroRTTSetup holds the gateway's: the client cannot complete its side
// before it has them, so it must send its request in 0-RTT, and the
// gateway cannot complete its own before the client's Finished, which
// comes after. (Holding only the client's packets left the client free to
// complete at once on a quick loopback and send in 1-RTT, which a loaded
// CI machine now and then did: "status 200 early false retried false".)
// It must stay under quic-go's 5 s handshake idle timeout, which a 5 s
// hold ran into.
const holdHandshake = 3500 * time.Millisecond

// zeroRTTSetup makes a first connection to get a ticket, then returns a
// client whose next connection goes through a relay that holds back the
// gateway's Handshake packets, so the client sends in 0-RTT and the
// gateway sees the request early.
func zeroRTTSetup(t *testing.T, h *harness, cred string) (*client.Client, *udprelay.Relay) {
	t.Helper()
	relay, err := udprelay.New(h.gw.Addr())
	if err != nil {
		t.Fatal(err)
	}
	tickets := &ticketSignal{ClientSessionCache: tls.NewLRUClientSessionCache(16), got: make(chan struct{}, 1)}
	c := h.clientWithCache(t, cred, relay.Addr(), tickets)
	t.Cleanup(func() {
		// Let the held Handshake packets and then the client's
		// CONNECTION_CLOSE through before the relay goes, or the gateway
		// waits out the idle timeout at shutdown.
		relay.Release()
		c.CloseConnections()
		time.Sleep(200 * time.Millisecond)
		relay.Close()
	})
	res, err := c.Do(context.Background(), http.MethodGet, h.base+"/v1/models", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.Early {
		t.Fatal("the first connection cannot be early")
	}
	// The ticket arrives after the handshake, in its own time under load.
	select {
	case <-tickets.got:
	case <-time.After(10 * time.Second):
		t.Fatal("no session ticket within 10s of the first request")
	}
	c.CloseConnections()
	relay.HoldServerHandshake(holdHandshake)
	return c, relay
}

// testWindow is the freshness window of warmHarness's gateway: short, so
// that the in-memory register's warm-up passes quickly.
const testWindow = 2 * time.Second

// warmHarness starts a gateway with a testWindow freshness window (then
// applies extra, if any) and waits out the in-memory register's warm-up,
// during which it declines 0-RTT for two windows after start-up. The
// warm-up is wall-clock time with nothing to poll, hence the sleep.
func warmHarness(t *testing.T, extra func(*Config)) *harness {
	t.Helper()
	h := newHarness(t, func(c *Config) {
		strikes := tlsbind.NewMemoryStrikes()
		rg, err := tlsbind.NewReplayGuard(strikes, testWindow)
		if err != nil {
			t.Fatal(err)
		}
		tk, err := tlsbind.NewTickets(tlsbind.TicketConfig{Instance: "a", Strikes: strikes, Window: config.Duration(testWindow), Registerer: c.Registry}, discardLog())
		if err != nil {
			t.Fatal(err)
		}
		c.Auth.Replay, c.Auth.Tickets = rg, tk
		if extra != nil {
			extra(c)
		}
	})
	time.Sleep(tlsbind.WarmUp(testWindow) + 100*time.Millisecond)
	return h
}

func TestZeroRTTInferenceServedBeforeHandshake(t *testing.T) {
	h := warmHarness(t, nil)
	c, _ := zeroRTTSetup(t, h, h.cred)
	res, err := c.Do(context.Background(), http.MethodPost, h.base+"/v1/chat/completions", nil, []byte(chat("")))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || !res.Early || res.Retried {
		t.Fatalf("resumed inference: status %d early %v retried %v, want 200 served early (ticket decisions: %s)\n%s", res.StatusCode, res.Early, res.Retried, h.ticketDecisions(t), body)
	}
	if got := h.counter(t, "h3infer_early_data_requests_total", "accepted"); got != 1 {
		t.Errorf("early accepted = %v, want 1", got)
	}
	if got := h.counter(t, "h3infer_session_tickets_total", tlsbind.TicketEarlyAllowed); got != 1 {
		t.Errorf("tickets allowed early = %v, want 1", got)
	}
}

func TestZeroRTTDeclinedWhileWarmingUp(t *testing.T) {
	h := newHarness(t, nil)
	// Right after start-up the in-memory register declines 0-RTT; the
	// client retries in 1-RTT and still gets its answer.
	c, _ := zeroRTTSetup(t, h, h.cred)
	res, err := c.Do(context.Background(), http.MethodPost, h.base+"/v1/chat/completions", nil, []byte(chat("")))
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || res.Early || !res.Retried {
		t.Fatalf("status %d early %v retried %v, want 200 after a 1-RTT retry", res.StatusCode, res.Early, res.Retried)
	}
	if got := h.counter(t, "h3infer_session_tickets_total", tlsbind.TicketWarmingUp); got < 1 {
		t.Errorf("tickets declined while warming up = %v, want at least 1", got)
	}
}

func TestZeroRTTRejectPolicyRetriesIn1RTT(t *testing.T) {
	h := warmHarness(t, func(c *Config) {
		c.Auth.EarlyData = map[string]tlsbind.EarlyPolicy{"/v1/chat/completions": tlsbind.EarlyReject}
	})
	c, _ := zeroRTTSetup(t, h, h.cred)
	res, err := c.Do(context.Background(), http.MethodPost, h.base+"/v1/chat/completions", nil, []byte(chat("")))
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || res.Early || !res.Retried {
		t.Fatalf("status %d early %v retried %v, want 200 after a 425 and a 1-RTT retry (ticket decisions: %s)", res.StatusCode, res.Early, res.Retried, h.ticketDecisions(t))
	}
	if got := h.counter(t, "h3infer_early_data_requests_total", "rejected"); got != 1 {
		t.Errorf("early rejected = %v, want 1", got)
	}
}

// ticketDecisions lists what the gateway decided about each session
// ticket offered for 0-RTT, for failure messages.
func (h *harness) ticketDecisions(t *testing.T) string {
	t.Helper()
	mfs, err := h.gw.cfg.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, mf := range mfs {
		if mf.GetName() != "h3infer_session_tickets_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				out = append(out, fmt.Sprintf("%s=%v", l.GetValue(), m.GetCounter().GetValue()))
			}
		}
	}
	return strings.Join(out, " ")
}

// TestZeroRTTBoundToken: a bind=required token in real 0-RTT without an
// early proof gets 425 even on a route whose policy serves early requests
// (its binding proof needs the exporter, which the client has only after
// the handshake); the client package, proving its secret with an early
// proof, is served.
func TestZeroRTTBoundToken(t *testing.T) {
	h := warmHarness(t, func(c *Config) {
		c.Auth.EarlyData = map[string]tlsbind.EarlyPolicy{"/v1/chat/completions": tlsbind.EarlyServe}
	})
	bound := h.issue(t, tlsbind.Claims{Tenant: "native", Bind: tlsbind.BindRequired})

	// A GET in 0-RTT with the bearer token alone, as whoever lifted it
	// off a log would send it.
	relay, err := udprelay.New(h.gw.Addr())
	if err != nil {
		t.Fatal(err)
	}
	tickets := &ticketSignal{ClientSessionCache: tls.NewLRUClientSessionCache(4), got: make(chan struct{}, 1)}
	conf := &tls.Config{RootCAs: h.pool, ClientSessionCache: tickets, NextProtos: []string{http3.NextProtoH3}}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	first, err := quic.DialAddr(ctx, relay.Addr(), conf, nil)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-tickets.got:
	case <-time.After(10 * time.Second):
		t.Fatal("no session ticket within 10s of the handshake")
	}
	first.CloseWithError(0, "")
	relay.HoldServerHandshake(holdHandshake)
	qc, err := quic.DialAddrEarly(ctx, relay.Addr(), conf, nil)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http3.Transport{}
	t.Cleanup(func() {
		relay.Release()
		qc.CloseWithError(0, "")
		tr.Close()
		time.Sleep(200 * time.Millisecond)
		relay.Close()
	})
	req, _ := http.NewRequestWithContext(ctx, http3.MethodGet0RTT, h.base+"/v1/models", nil)
	req.Header.Set("Authorization", "Bearer "+bearerOfCredential(t, bound))
	resp, err := tr.NewClientConn(qc).RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	code := errorCode(t, resp)
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooEarly || code != "too_early" {
		t.Fatalf("bind=required GET in 0-RTT without a proof: %d %s, want 425 too_early (ticket decisions: %s)", resp.StatusCode, code, h.ticketDecisions(t))
	}
	if got := h.counter(t, "h3infer_early_data_requests_total", "rejected"); got != 1 {
		t.Errorf("early rejected = %v, want 1", got)
	}

	// The holder of the credential, beside it.
	c, _ := zeroRTTSetup(t, h, bound)
	res, err := c.Do(context.Background(), http.MethodPost, h.base+"/v1/chat/completions", nil, []byte(chat("")))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || !res.Early {
		t.Fatalf("client package with bind=required: status %d early %v retried %v, want 200 served early with its early proof (ticket decisions: %s)\n%s", res.StatusCode, res.Early, res.Retried, h.ticketDecisions(t), body)
	}
}
