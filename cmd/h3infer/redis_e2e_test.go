package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"h3infer/certs"
	"h3infer/certs/keysredis"
	"h3infer/internal/redistest"
)

// gatewayACL is the ACL docs/CONFIG.md ("Redis") recommends.
const gatewayACL = "~h3infer:* +@read +@write +@scripting +@transaction +@connection -@dangerous +time"

// TestServeWithRedisACLAndTLS runs serve against a Redis that speaks only
// TLS and admits only an ACL user, configured by one rediss:// URL and a
// CA file, for all three uses: the strike register (a resumed 0-RTT run of
// `h3infer chat` strikes its ticket there), the session keys (sealed: what
// Redis holds contains none of them) and the rate limits (a budget kept in
// Redis runs out). A wrong password and an unknown CA stop serve at
// start-up with an error naming the key and not the password; so does a
// seal key that cannot open the session keys in Redis, whether another
// instance's or because someone with Redis access wrote keys of their own.
func TestServeWithRedisACLAndTLS(t *testing.T) {
	ortLib(t)
	dev, err := certs.EnsureDev(filepath.Join(t.TempDir(), "redis-ca"), certs.DevOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const user, password = "gw", "s3cret-redis-pw"
	srv := redistest.StartServer(t, redistest.Options{
		// The rules docs/CONFIG.md recommends for the gateway's user.
		Users: []redistest.User{{Name: user, Password: password, Rules: strings.Fields(gatewayACL)}},
		TLS:   &redistest.TLSFiles{CertFile: dev.CertFile, KeyFile: dev.KeyFile, CAFile: dev.CAFile},
	})
	const burst = 6
	config := func(url, caFile string) string {
		c := map[string]any{
			"redis": map[string]any{"url": url, "ca_file": caFile},
			"zero_rtt": map[string]any{
				"strike_register": "redis", "session_keys_store": "redis",
			},
			"rate_limits": map[string]any{
				"store":   "redis",
				"default": map[string]any{"requests_per_second": 0.01, "request_burst": burst},
			},
		}
		if caFile == "" {
			delete(c["redis"].(map[string]any), "ca_file")
		}
		b, _ := json.Marshal(c)
		path := filepath.Join(t.TempDir(), "config.json")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	goodConfig := config(srv.URL(user, password), dev.CAFile)
	s := startServer(t, "--config", goodConfig)

	opts, err := redis.ParseURL(srv.URL(user, password))
	if err != nil {
		t.Fatal(err)
	}
	if opts.TLSConfig.RootCAs, err = certs.LoadPool(dev.CAFile); err != nil {
		t.Fatal(err)
	}
	rc := redis.NewClient(opts)
	defer rc.Close()
	ctx := context.Background()

	// Session keys: sealed in Redis with the state dir's seal key.
	stored, err := rc.Get(ctx, keysredis.DefaultKey).Bytes()
	if err != nil {
		t.Fatalf("no session keys in Redis: %v", err)
	}
	seal, err := keysredis.LoadSealKey(filepath.Join(s.stateDir, "session-keys.seal"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := keysredis.New(rc, "", seal)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := st.Current(ctx, time.Now(), time.Hour)
	if err != nil {
		t.Fatalf("the seal key serve made does not open what it stored: %v", err)
	}
	for _, k := range [][32]byte{keys.TicketKeys[0], keys.TokenGeneratorKey, keys.StatelessResetKey} {
		if bytes.Contains(stored, k[:]) || bytes.Contains(stored, []byte(base64.StdEncoding.EncodeToString(k[:]))) {
			t.Fatalf("Redis holds a session key in the clear: %q", stored)
		}
	}

	// Strike register: a run of chat that resumes in 0-RTT strikes its
	// ticket in Redis. As in TestChatResumesIn0RTT a run may end before
	// its next ticket arrives, so allow a few.
	chat := func() {
		t.Helper()
		cmd := exec.Command(buildBinary(t), "chat", "--url", s.base, "--state-dir", s.stateDir, "--max-tokens", "4", testPrompt)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("h3infer chat: %v\n%s", err, out)
		}
	}
	runs := 0
	var strikes []string
	for runs < 4 && len(strikes) == 0 {
		chat()
		runs++
		if strikes, err = scanKeys(ctx, rc, "h3infer:strike:*"); err != nil {
			t.Fatal(err)
		}
	}
	if len(strikes) == 0 {
		t.Errorf("after %d chat runs the strike register in Redis is empty", runs)
	}

	// Rate limits: the budget is kept in Redis and runs out.
	c := s.h3Client(t)
	for i := runs; i < burst; i++ {
		resp := postJSON(t, ctx, c, s.base+"/v1/chat/completions", chatBody(2, false))
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d within the burst: status %d", i, resp.StatusCode)
		}
	}
	resp := postJSON(t, ctx, c, s.base+"/v1/chat/completions", chatBody(2, false))
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Errorf("request past the burst: status %d, want 429", resp.StatusCode)
	}
	if buckets, err := scanKeys(ctx, rc, "h3infer:rl:*"); err != nil || len(buckets) == 0 {
		t.Errorf("no rate-limit bucket in Redis: %v, %v", buckets, err)
	}
	if n := metric(t, s, "h3infer_rate_limit_store_errors_total"); n != 0 {
		t.Errorf("%v rate-limit store errors: the limits were not decided in Redis\n%s", n, s.stderr)
	}

	// serveFails runs serve with config and its own state dir (or the
	// given one), wants it to stop before listening, and returns its
	// output.
	serveFails := func(config, stateDir string) string {
		t.Helper()
		if stateDir == "" {
			stateDir = t.TempDir()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, buildBinary(t), "serve", "--config", config, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", stateDir)
		cmd.Env = append(os.Environ(), "ONNXRUNTIME_LIB="+ortLib(t))
		out, err := cmd.CombinedOutput()
		if err == nil || strings.Contains(string(out), "listening") {
			t.Fatalf("serve started (%v):\n%s", err, out)
		}
		if strings.Contains(string(out), password) {
			t.Errorf("serve printed the Redis password:\n%s", out)
		}
		return string(out)
	}
	for name, tc := range map[string]struct {
		config string
		want   []string
	}{
		"wrong password": {config(srv.URL(user, "wrong-pw"), dev.CAFile), []string{"redis.url", "WRONGPASS"}},
		"unknown user":   {config(srv.URL("mallory", password), dev.CAFile), []string{"redis.url", "WRONGPASS"}},
		"unknown CA":     {config(srv.URL(user, password), ""), []string{"redis.url", "certificate signed by unknown authority"}},
		// Another instance with a seal key of its own (a fresh state dir).
		"other seal key": {goodConfig, []string{"zero_rtt.session_keys_seal_file", "cannot be opened"}},
	} {
		t.Run(name, func(t *testing.T) {
			out := serveFails(tc.config, "")
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("serve's error lacks %q:\n%s", w, out)
				}
			}
		})
	}

	// Someone with write access to Redis but no seal key replaces the
	// session keys with their own: an instance that starts refuses them,
	// and they are left as they are, not replaced.
	evil, err := certs.NewSessionKeys(time.Now().Add(-24 * time.Hour)) // due for rotation, too
	if err != nil {
		t.Fatal(err)
	}
	evilJSON, _ := json.Marshal(evil)
	if err := rc.Set(ctx, keysredis.DefaultKey, evilJSON, 0).Err(); err != nil {
		t.Fatal(err)
	}
	out := serveFails(goodConfig, s.stateDir)
	if !strings.Contains(out, "zero_rtt.session_keys_seal_file") || !strings.Contains(out, "not sealed") {
		t.Errorf("serve with attacker's keys in Redis: want an error naming zero_rtt.session_keys_seal_file:\n%s", out)
	}
	if now, _ := rc.Get(ctx, keysredis.DefaultKey).Bytes(); !bytes.Equal(now, evilJSON) {
		t.Error("serve replaced the keys it could not open")
	}
	// The instance already running keeps its keys and serves.
	resp, err = c.Get(s.base + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("running instance: GET /v1/models = %d", resp.StatusCode)
	}
}

// scanKeys lists the keys matching pattern with SCAN (the gateway's ACL
// user may not run KEYS).
func scanKeys(ctx context.Context, rc *redis.Client, pattern string) ([]string, error) {
	var out []string
	it := rc.Scan(ctx, 0, pattern, 100).Iterator()
	for it.Next(ctx) {
		out = append(out, it.Val())
	}
	return out, it.Err()
}
