//go:build !race

// The replay test runs a 0-RTT client in the test process; see the note in
// gateway/zerortt_test.go on why it runs without the race detector.

package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
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

// TestReplayedZeroRTTRunsOnce records the datagrams of a real 0-RTT
// inference request at a relay and sends them again from a new address,
// once to the same gateway and once to a second instance that shares the
// ticket keys and the Redis strike register. The worker must run the
// inference exactly once.
func TestReplayedZeroRTTRunsOnce(t *testing.T) {
	ortLib(t)
	redisAddr := redistest.StartTCP(t)
	shared := t.TempDir()
	dev, err := certs.EnsureDev(filepath.Join(shared, "certs"), certs.DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	config := func(instance string) string {
		c := map[string]any{
			"tls":  map[string]any{"cert_file": dev.CertFile, "key_file": dev.KeyFile},
			"auth": map[string]any{"keys_file": filepath.Join(shared, "tokens", "keys.json")},
			"zero_rtt": map[string]any{
				"instance": instance, "trusted_instances": []string{"a", "b"},
				"session_keys_file": filepath.Join(shared, "session-keys.json"),
				"strike_register":   "redis", "redis_addr": redisAddr,
			},
		}
		b, _ := json.Marshal(c)
		path := filepath.Join(shared, instance+".json")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	a := startServer(t, "--config", config("a"))
	b := startServer(t, "--config", config("b"))

	relay, err := udprelay.New(strings.TrimPrefix(a.base, "https://"))
	if err != nil {
		t.Fatal(err)
	}
	cred, err := os.ReadFile(filepath.Join(a.stateDir, "tokens", "dev.token"))
	if err != nil {
		t.Fatal(err)
	}
	pool, err := certs.LoadPool(dev.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	cl, err := client.New(client.Config{TLS: &tls.Config{RootCAs: pool}, Credential: string(cred), DialAddr: relay.Addr()})
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
	// Which layer stopped it varies with timing (a may still match the
	// replay to the closed connection's IDs; a lost Initial means no
	// ticket at all), so it is logged, not asserted; the count above is
	// what a user would notice.
	for name, s := range map[string]*server{"a": a, "b": b} {
		t.Logf("instance %s: tickets declined as reused %v, early requests replay-blocked %v", name,
			labelled(t, s, `h3infer_session_tickets_total{outcome="declined_reused"}`),
			labelled(t, s, `h3infer_early_data_requests_total{outcome="replay_blocked"}`))
	}
	t.Logf("recorded %d datagrams and replayed them to both instances", len(recorded))
}
