//go:build !race

// The replay test runs a 0-RTT client in the test process; see the note in
// gateway/zerortt_test.go on why it runs without the race detector.

package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"h3infer/certs"
	"h3infer/client"
	"h3infer/internal/redistest"
	"h3infer/internal/udprelay"
)

// labelled reads one sample, name{labels}, from a server's metrics.
func labelled(t *testing.T, s *server, sample string) float64 {
	t.Helper()
	resp, err := http.Get(s.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			var f float64
			fmt.Sscan(v, &f)
			return f
		}
	}
	return 0
}

// replayConfig writes the config of one of two instances that share the
// dev certificate, the token signing keys and the session keys file (TLS
// ticket, QUIC token and reset keys) under shared, with zeroRTT merged
// into zero_rtt.
func replayConfig(t *testing.T, shared string, dev *certs.Dev, name string, zeroRTT map[string]any) string {
	t.Helper()
	z := map[string]any{"session_keys_file": filepath.Join(shared, "session-keys.json")}
	maps.Copy(z, zeroRTT)
	b, err := json.Marshal(map[string]any{
		"tls":      map[string]any{"cert_file": dev.CertFile, "key_file": dev.KeyFile},
		"auth":     map[string]any{"keys_file": filepath.Join(shared, "tokens", "keys.json")},
		"zero_rtt": z,
	})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(shared, name+".json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// replayRun is what replayZeroRTT leaves for the test's own checks.
type replayRun struct {
	cred  string
	pool  *x509.CertPool
	cache tls.ClientSessionCache // holds the tickets a gave the client
}

// replayZeroRTT records the datagrams of a real 0-RTT inference request to
// a at a relay and sends them again from a new address, once to a and once
// to b. The worker must run the inference exactly once.
func replayZeroRTT(t *testing.T, a, b *server, caFile string) replayRun {
	t.Helper()
	relay, err := udprelay.New(strings.TrimPrefix(a.base, "https://"))
	if err != nil {
		t.Fatal(err)
	}
	cred, err := os.ReadFile(filepath.Join(a.stateDir, "tokens", "dev.token"))
	if err != nil {
		t.Fatal(err)
	}
	pool, err := certs.LoadPool(caFile)
	if err != nil {
		t.Fatal(err)
	}
	run := replayRun{cred: string(cred), pool: pool, cache: tls.NewLRUClientSessionCache(16)}
	cl, err := client.New(client.Config{TLS: &tls.Config{RootCAs: pool, ClientSessionCache: run.cache}, Credential: run.cred, DialAddr: relay.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	// Long enough that the gateway handles the request before the held
	// handshake completes, even on a loaded machine (see gateway's
	// holdHandshake).
	const hold = 2 * time.Second
	t.Cleanup(func() {
		relay.Release()
		cl.Close()
		time.Sleep(200 * time.Millisecond)
		relay.Close()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// A first connection fetches a ticket.
	res, err := cl.Do(ctx, http.MethodGet, a.base+"/v1/models", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	time.Sleep(200 * time.Millisecond)
	cl.CloseConnections()

	started := func() float64 {
		return metric(t, a, "h3infer_worker_sequences_started_total") + metric(t, b, "h3infer_worker_sequences_started_total")
	}
	if n := started(); n != 0 {
		t.Fatalf("workers started %v sequences before the test's request", n)
	}

	// The resumed connection's inference goes out in 0-RTT; holding the
	// Handshake packets makes the gateway answer it before the handshake.
	relay.Record()
	relay.HoldHandshake(hold)
	body := `{"model":"demo","messages":[{"role":"user","content":"The gateway"}],"max_tokens":4}`
	res, err = cl.Do(ctx, http.MethodPost, a.base+"/v1/chat/completions", http.Header{"Content-Type": {"application/json"}}, []byte(body))
	if err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || !res.Early {
		t.Fatalf("0-RTT inference: status %d early %v, want 200 served early\n%s", res.StatusCode, res.Early, out)
	}
	recorded := relay.Recorded()
	relay.HoldHandshake(0)
	// Workers report their counters every stats interval: wait for the
	// report that covers the request.
	for deadline := time.Now().Add(5 * time.Second); started() < 1 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	if n := started(); n != 1 {
		t.Fatalf("after the real request the workers started %v sequences, want 1", n)
	}

	for _, target := range []*server{a, b} {
		if err := udprelay.Replay(strings.TrimPrefix(target.base, "https://"), recorded, 2*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	// Give any inference the replay might have started time to show.
	time.Sleep(time.Second)
	if n := started(); n != 1 {
		t.Errorf("after replaying the datagrams to both instances the workers started %v sequences, want 1", n)
	}
	// Which layer stopped it at a varies with timing (a may still match
	// the replay to the closed connection's IDs; a lost Initial means no
	// ticket at all), so it is logged, not asserted; the count above is
	// what a user would notice.
	for name, s := range map[string]*server{"a": a, "b": b} {
		t.Logf("instance %s: tickets declined as reused %v, as foreign %v, early requests replay-blocked %v", name,
			labelled(t, s, `h3infer_session_tickets_total{outcome="declined_reused"}`),
			labelled(t, s, `h3infer_session_tickets_total{outcome="declined_foreign_instance"}`),
			labelled(t, s, `h3infer_early_data_requests_total{outcome="replay_blocked"}`))
	}
	t.Logf("recorded %d datagrams and replayed them to both instances", len(recorded))
	return run
}

// TestReplayedZeroRTTRunsOnce replays a real 0-RTT inference request to
// the gateway that served it and to a second instance that shares the
// ticket keys and trusts the first, both using one Redis strike register.
func TestReplayedZeroRTTRunsOnce(t *testing.T) {
	ortLib(t)
	redisAddr := redistest.StartTCP(t)
	shared := t.TempDir()
	dev, err := certs.EnsureDev(filepath.Join(shared, "certs"), certs.DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	config := func(name string) string {
		return replayConfig(t, shared, dev, name, map[string]any{
			"instance": name, "trusted_instances": []string{"a", "b"},
			"strike_register": "redis", "redis_addr": redisAddr,
		})
	}
	a := startServer(t, "--config", config("a"))
	b := startServer(t, "--config", config("b"))
	replayZeroRTT(t, a, b, dev.CAFile)
}

// TestReplayedZeroRTTRunsOnceWithMemoryRegisters is the same attack on two
// instances that share the session keys file (as docs/AUTH.md advises for
// resumption) but not Redis: each keeps its strike register in memory and
// names itself. The replay sent to b must not run there, because b
// declines a's tickets for 0-RTT; a client holding a's ticket still
// resumes at b, in 1-RTT.
func TestReplayedZeroRTTRunsOnceWithMemoryRegisters(t *testing.T) {
	ortLib(t)
	shared := t.TempDir()
	dev, err := certs.EnsureDev(filepath.Join(shared, "certs"), certs.DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// The default zero_rtt config but for the window: long enough that
	// the replay reaches b while the recorded request's early proof is
	// still fresh (so only the ticket's instance can stop it there), short
	// enough that the warm-up after start (two windows) passes quickly.
	const window = 4 * time.Second
	config := func(name string) string {
		return replayConfig(t, shared, dev, name, map[string]any{"window": window.String()})
	}
	a := startServer(t, "--config", config("a"))
	b := startServer(t, "--config", config("b"))
	time.Sleep(2*window + 100*time.Millisecond)

	run := replayZeroRTT(t, a, b, dev.CAFile)
	foreign := `h3infer_session_tickets_total{outcome="declined_foreign_instance"}`
	if n := labelled(t, b, foreign); n < 1 {
		t.Errorf("b declined %v tickets as another instance's, want the replayed one", n)
	}

	// A legitimate client with a's ticket is served by b after resuming
	// in 1-RTT.
	before := labelled(t, b, foreign)
	cl, err := client.New(client.Config{TLS: &tls.Config{RootCAs: run.pool, ClientSessionCache: run.cache}, Credential: run.cred})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	body := `{"model":"demo","messages":[{"role":"user","content":"The gateway"}],"max_tokens":4}`
	res, err := cl.Do(ctx, http.MethodPost, b.base+"/v1/chat/completions", http.Header{"Content-Type": {"application/json"}}, []byte(body))
	if err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || res.Early || res.TLS == nil || !res.TLS.DidResume {
		t.Fatalf("a's client at b: status %d early %v resumed %v, want 200 after resuming in 1-RTT\n%s", res.StatusCode, res.Early, res.TLS != nil && res.TLS.DidResume, out)
	}
	// The retry may resume with a's ticket again or with one b just gave.
	if n := labelled(t, b, foreign); n < before+1 {
		t.Errorf("b declined %v tickets as foreign after the client's, want at least %v", n, before+1)
	}
}
