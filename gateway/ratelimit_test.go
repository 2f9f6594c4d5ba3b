package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"h3infer/config"
	"h3infer/infer"
	"h3infer/internal/redistest"
	"h3infer/ratelimit"
	"h3infer/scheduler"
)

func scrape(t *testing.T, h *harness) string {
	t.Helper()
	r, err := http.Get(h.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return string(b)
}

// checkRefusal asserts a 429 in the OpenAI error shape with Retry-After.
func checkRefusal(t *testing.T, resp *http.Response, wantPolicy string) {
	t.Helper()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("status %d, want 429; body %s", resp.StatusCode, body)
	}
	if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || s < 1 {
		t.Errorf("Retry-After %q, want whole seconds >= 1", resp.Header.Get("Retry-After"))
	}
	if got := resp.Header.Get("RateLimit-Policy"); got != wantPolicy {
		t.Errorf("RateLimit-Policy %q, want %q", got, wantPolicy)
	}
	var e struct {
		Error struct {
			Type string  `json:"type"`
			Code *string `json:"code"`
		} `json:"error"`
	}
	if err := json.Unmarshal(body, &e); err != nil || e.Error.Code == nil || *e.Error.Code != "rate_limit_exceeded" {
		t.Errorf("body %s: want an OpenAI error with code rate_limit_exceeded", body)
	}
}

func TestRequestRateLimitPerTenant(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.RateLimits = RateLimits{
			Default: TenantLimit{RequestsPerSecond: 0.25, RequestBurst: 2},
			Tenants: map[string]TenantLimit{"gold": {}},
		}
		c.Tenant = func(r *http.Request) string {
			if v := r.Header.Get("X-Tenant"); v != "" {
				return v
			}
			return scheduler.DefaultTenant
		}
	})
	for i := range 2 {
		resp := h.post(t, "h3", "/v1/chat/completions", chatStream)
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: status %d", i, resp.StatusCode)
		}
		if got, want := resp.Header.Get("RateLimit"), `"requests";r=`+strconv.Itoa(1-i)+`;t=`; !strings.HasPrefix(got, want) {
			t.Errorf("request %d: RateLimit %q, want prefix %q", i, got, want)
		}
	}
	checkRefusal(t, h.post(t, "h2", "/v1/chat/completions", chatStream), `"requests";q=2;w=8`)
	// A tenant with its own (empty) limits is not held back by the default's.
	for range 3 {
		resp := h.post(t, "h3", "/v1/chat/completions", chatStream, "X-Tenant", "gold")
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("gold tenant: status %d", resp.StatusCode)
		}
	}
	// An unlisted tenant has the default limits, its own bucket, and the
	// label "other".
	for range 2 {
		io.Copy(io.Discard, h.post(t, "h3", "/v1/chat/completions", chatStream, "X-Tenant", "t-123").Body)
	}
	checkRefusal(t, h.post(t, "h3", "/v1/chat/completions", chatStream, "X-Tenant", "t-123"), `"requests";q=2;w=8`)
	text := scrape(t, h)
	for _, want := range []string{
		`h3infer_rate_limit_refusals_total{limit="requests",tenant="default"} 1`,
		`h3infer_rate_limit_refusals_total{limit="requests",tenant="other"} 1`,
		`h3infer_http_requests_total{protocol="h2",route="/v1/chat/completions",status="429"} 1`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	promtoolCheck(t, text)
}

// longAnswer is a finished stream of n one-token events.
func longAnswer(n int) []infer.Event {
	var texts []string
	for range n {
		texts = append(texts, "x")
	}
	return append(tokens(texts...), done(infer.FinishLength, 3, uint32(n)))
}

func TestOutputTokensPaced(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.RateLimits.Default = TenantLimit{OutputTokensPerSecond: 20, OutputTokenBurst: 1}
	})
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return longAnswer(11), nil })
	start := time.Now()
	resp := h.post(t, "h3", "/v1/chat/completions", chatStream)
	events := sseEvents(t, resp.Body)
	elapsed := time.Since(start)
	// The burst covers the first token; the other ten owe 50ms each. This
	// is a lower bound, which load can only lengthen.
	if elapsed < 500*time.Millisecond {
		t.Errorf("11 tokens at 20/s streamed in %v, want >= 500ms", elapsed)
	}
	if last := events[len(events)-1]; last != "[DONE]" {
		t.Errorf("paced stream ended with %q, want [DONE]", last)
	}
}

func TestOutputTokensCutOff(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.RateLimits = RateLimits{Default: TenantLimit{OutputTokensPerSecond: 0.1, OutputTokenBurst: 3}, CutOff: true}
	})
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return longAnswer(10), nil })
	resp := h.post(t, "h3", "/v1/chat/completions", chatStream)
	events := sseEvents(t, resp.Body)
	last := events[len(events)-1]
	if !strings.Contains(last, "rate_limit_exceeded") {
		t.Fatalf("cut-off stream ended with %q, want a rate_limit_exceeded error event", last)
	}
	// Opening chunk plus the three tokens of the burst, then the error.
	if len(events) != 5 {
		t.Errorf("got %d events, want 5: %q", len(events), events)
	}
	// Non-streamed, the bucket is already empty: a 429 after the first
	// token.
	resp = h.post(t, "h2", "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"hi"}]}`)
	checkRefusal(t, resp, "")
	// The harness's token names a tenant the limits do not list: "other".
	if !strings.Contains(scrape(t, h), `h3infer_rate_limit_refusals_total{limit="tokens",tenant="other"} 2`) {
		t.Error("token refusals not counted")
	}
}

func TestConcurrencyCap(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.RateLimits.Default = TenantLimit{MaxConcurrent: 1}
	})
	// The first request's stream stays open: a worker still generating.
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return tokens("a"), nil })
	first := h.post(t, "h3", "/v1/chat/completions", chatStream)
	if first.StatusCode != http.StatusOK {
		t.Fatalf("first: status %d", first.StatusCode)
	}
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return longAnswer(2), nil })
	checkRefusal(t, h.post(t, "h3", "/v1/chat/completions", chatStream), "")
	// Ending the first frees the slot.
	_, st := h.sched.last()
	st.events <- done(infer.FinishStop, 1, 1)
	close(st.events)
	io.Copy(io.Discard, first.Body)
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp := h.post(t, "h3", "/v1/chat/completions", chatStream)
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode == http.StatusOK {
			break
		}
		// The handler releases its slot just after the client has read
		// the end of the stream.
		if time.Now().After(deadline) {
			t.Fatalf("slot never freed: status %d", resp.StatusCode)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(scrape(t, h), `h3infer_rate_limit_refusals_total{limit="concurrency",tenant="default"}`) {
		t.Error("concurrency refusals not counted")
	}
}

// TestRedisSharedLimit runs two gateway instances against one real Redis:
// the request budget is global, not per instance.
func TestRedisSharedLimit(t *testing.T) {
	client := redistest.Start(t)
	limits := func(c *Config) {
		c.RateLimits = RateLimits{
			Default: TenantLimit{RequestsPerSecond: 0.1, RequestBurst: 3},
			Store:   ratelimit.NewRedis(client, "h3infer:rl:"),
		}
	}
	a, b := newHarness(t, limits), newHarness(t, limits)
	// Each harness checks for leaks against what ran when it started, so
	// close every client connection before either looks.
	t.Cleanup(func() {
		a.closeClients()
		b.closeClients()
		client.Close()
	})
	for i, h := range []*harness{a, b, a} {
		resp := h.post(t, "h3", "/v1/chat/completions", chatStream)
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: status %d", i, resp.StatusCode)
		}
	}
	checkRefusal(t, b.post(t, "h3", "/v1/chat/completions", chatStream), `"requests";q=3;w=30`)
	checkRefusal(t, a.post(t, "h2", "/v1/chat/completions", chatStream), `"requests";q=3;w=30`)
}

// TestRedisDownFallsBackToLocalLimits stops the shared store's Redis in
// the middle of a test: the limits must still hold, decided by this
// instance alone, where a store error used to admit every request. The
// requests within the limit still pass, the metrics count the store
// errors and the fallback's decisions, and once Redis is back the limits
// are decided there again.
func TestRedisDownFallsBackToLocalLimits(t *testing.T) {
	srv := redistest.StartServer(t, redistest.Options{})
	client := redis.NewClient(&redis.Options{Addr: srv.Addr, MaxRetries: -1})
	h := newHarness(t, func(c *Config) {
		c.RateLimits = RateLimits{
			Default:    TenantLimit{RequestsPerSecond: 0.1, RequestBurst: 2},
			Store:      ratelimit.NewRedis(client, "h3infer:rl:"),
			StoreRetry: config.Duration(50 * time.Millisecond),
		}
	})
	t.Cleanup(func() {
		h.closeClients()
		client.Close()
	})
	ok := func(i int) {
		t.Helper()
		resp := h.post(t, "h3", "/v1/chat/completions", chatStream)
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: status %d, want 200", i, resp.StatusCode)
		}
	}
	ok(0) // through Redis
	if keys, err := client.Keys(context.Background(), "h3infer:rl:req:*").Result(); err != nil || len(keys) != 1 {
		t.Fatalf("the first request left no bucket in Redis: %v, %v", keys, err)
	}
	srv.Stop()

	// The local bucket starts full: the burst passes, the next is refused.
	ok(1)
	ok(2)
	checkRefusal(t, h.post(t, "h2", "/v1/chat/completions", chatStream), `"requests";q=2;w=20`)
	time.Sleep(60 * time.Millisecond) // past store_retry: Redis is tried again, and fails again
	checkRefusal(t, h.post(t, "h3", "/v1/chat/completions", chatStream), `"requests";q=2;w=20`)

	text := scrape(t, h)
	for _, want := range []string{
		`h3infer_rate_limit_fallback_decisions_total{result="admitted"} 2`,
		`h3infer_rate_limit_fallback_decisions_total{result="refused"} 2`,
		`h3infer_rate_limit_refusals_total{limit="requests",tenant="other"} 2`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	errs := metricValue(t, text, "h3infer_rate_limit_store_errors_total")
	if errs < 2 {
		t.Errorf("store errors counted: %v, want >= 2 (one when Redis went, one on the retry)", errs)
	}
	promtoolCheck(t, text)

	// Redis comes back (empty): after store_retry the limits are decided
	// there again, with a fresh bucket, and the fallback stops counting.
	srv.Restart(t)
	time.Sleep(60 * time.Millisecond)
	ok(3)
	if keys, err := client.Keys(context.Background(), "h3infer:rl:req:*").Result(); err != nil || len(keys) != 1 {
		t.Fatalf("after Redis came back the request left no bucket there: %v, %v", keys, err)
	}
	text = scrape(t, h)
	if n := metricValue(t, text, "h3infer_rate_limit_store_errors_total"); n != errs {
		t.Errorf("store errors went from %v to %v with Redis back", errs, n)
	}
	if !strings.Contains(text, `h3infer_rate_limit_fallback_decisions_total{result="admitted"} 2`) {
		t.Errorf("the fallback decided with Redis back")
	}
}

// metricValue is the value of an unlabelled metric in an exposition.
func metricValue(t *testing.T, text, name string) float64 {
	t.Helper()
	for line := range strings.Lines(text) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// TestSetRateLimits changes the limits of a running gateway: invalid limits
// are refused and the old ones stay, new limits apply to the next request,
// and a completion admitted before the swap still counts against the new
// concurrency cap until it ends.
func TestSetRateLimits(t *testing.T) {
	h := newHarness(t, nil)
	ok := func(what string) {
		t.Helper()
		resp := h.post(t, "h3", "/v1/chat/completions", chatStream)
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: status %d, want 200", what, resp.StatusCode)
		}
	}
	ok("no limits")
	if err := h.gw.SetRateLimits(RateLimits{Default: TenantLimit{RequestsPerSecond: -1}}); err == nil || !strings.Contains(err.Error(), "rate_limits.default.requests_per_second") {
		t.Fatalf("invalid limits: err %v, want one naming rate_limits.default.requests_per_second", err)
	}
	ok("after refused limits")

	if err := h.gw.SetRateLimits(RateLimits{Default: TenantLimit{RequestsPerSecond: 0.01, RequestBurst: 1}}); err != nil {
		t.Fatal(err)
	}
	ok("first under new limits")
	checkRefusal(t, h.post(t, "h3", "/v1/chat/completions", chatStream), `"requests";q=1;w=100`)

	// A stream admitted under a concurrency cap of 1 stays open across a
	// swap to new limits with the same cap: it still holds the slot.
	if err := h.gw.SetRateLimits(RateLimits{Default: TenantLimit{MaxConcurrent: 1}}); err != nil {
		t.Fatal(err)
	}
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return tokens("a"), nil })
	first := h.post(t, "h3", "/v1/chat/completions", chatStream)
	if first.StatusCode != http.StatusOK {
		t.Fatalf("held stream: status %d", first.StatusCode)
	}
	if err := h.gw.SetRateLimits(RateLimits{Default: TenantLimit{MaxConcurrent: 1}, Tenants: map[string]TenantLimit{"gold": {}}}); err != nil {
		t.Fatal(err)
	}
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return longAnswer(2), nil })
	checkRefusal(t, h.post(t, "h3", "/v1/chat/completions", chatStream), "")
	_, st := h.sched.last()
	st.events <- done(infer.FinishStop, 1, 1)
	close(st.events)
	io.Copy(io.Discard, first.Body)

	// Back to no limits: everything passes, the request bucket included.
	if err := h.gw.SetRateLimits(RateLimits{}); err != nil {
		t.Fatal(err)
	}
	ok("limits removed")
	ok("limits removed, again")
	// A tenant the new limits list gets its own label from the start.
	if !strings.Contains(scrape(t, h), `h3infer_rate_limit_refusals_total{limit="requests",tenant="gold"} 0`) {
		t.Error("refusal counter for a tenant added by a reload not initialised")
	}
}

// chatStreamFor is chatStream reserving maxTokens.
func chatStreamFor(maxTokens int) string {
	return fmt.Sprintf(`{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":%d}`, maxTokens)
}

// tokensIn counts the "x" tokens of longAnswer and heldAnswer in a stream's
// events.
func tokensIn(events []string) int {
	n := 0
	for _, e := range events {
		n += strings.Count(e, `"content":"x"`)
	}
	return n
}

// TestTokensPerMinuteReservation: admission reserves max_tokens, the end of
// the request gives back what it did not generate (over HTTP/3, before the
// client sees the end of the stream; over HTTP/2, before the response
// ends), a request that fails before its first token gives back
// everything, and a reservation above the burst is refused as invalid.
func TestTokensPerMinuteReservation(t *testing.T) {
	// 0.1 tokens a second: nothing comes back by itself during the test.
	h := newHarness(t, func(c *Config) {
		c.RateLimits.Default = TenantLimit{TokensPerMinute: 6, TokenBurst: 100}
	})
	const policy = `"tokens_per_minute";q=100;w=1000`
	ok := func(proto string, maxTokens, want int) {
		t.Helper()
		resp := h.post(t, proto, "/v1/chat/completions", chatStreamFor(maxTokens))
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(resp.Body)
			t.Fatalf("max_tokens %d: status %d, want 200; body %s", maxTokens, resp.StatusCode, b)
		}
		if got := resp.Header.Get("RateLimit-Policy"); got != policy {
			t.Errorf("RateLimit-Policy %q, want %q", got, policy)
		}
		if got := tokensIn(sseEvents(t, resp.Body)); got != want {
			t.Errorf("max_tokens %d: got %d tokens, want %d", maxTokens, got, want)
		}
	}
	// All of the burst reserved, 10 used: 90 come back.
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return longAnswer(10), nil })
	ok("h3", 100, 10)
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return longAnswer(80), nil })
	ok("h2", 90, 80)
	// Now 10 are left: 11 do not fit, and waiting helps.
	checkRefusal(t, h.post(t, "h3", "/v1/chat/completions", chatStreamFor(11)), policy)

	// A request that fails before its first token gives all 10 back.
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
		return []infer.Event{{Err: &infer.Error{Code: infer.CodeInternal, Message: "worker died"}}}, nil
	})
	resp := h.post(t, "h3", "/v1/chat/completions", chatStreamFor(10))
	io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusInternalServerError {
		t.Fatalf("failed request: status %d, want 500", resp.StatusCode)
	}
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return longAnswer(10), nil })
	ok("h3", 10, 10)
	checkRefusal(t, h.post(t, "h3", "/v1/chat/completions", chatStreamFor(1)), policy)

	// More than the burst never fits: 400, naming the parameter, or the
	// default when the request named none (256 here).
	for body, want := range map[string]string{
		chatStreamFor(101): "max_tokens: 101 exceeds the 100 tokens",
		chatStream:         "max_tokens: not given, and the default of 256 exceeds the 100 tokens",
	} {
		resp := h.post(t, "h3", "/v1/chat/completions", body)
		b, _ := io.ReadAll(resp.Body)
		var e struct {
			Error struct {
				Message string `json:"message"`
				Param   string `json:"param"`
			} `json:"error"`
		}
		if err := json.Unmarshal(b, &e); err != nil || resp.StatusCode != http.StatusBadRequest ||
			e.Error.Param != "max_tokens" || !strings.HasPrefix(e.Error.Message, want) {
			t.Errorf("status %d, body %s; want 400 for param max_tokens saying %q", resp.StatusCode, b, want)
		}
	}
	if !strings.Contains(scrape(t, h), `h3infer_rate_limit_refusals_total{limit="tokens_per_minute",tenant="other"} 2`) {
		t.Error("tokens_per_minute refusals not counted")
	}
}

// postAll sends n streaming requests reserving maxTokens each over HTTP/3,
// all at once, and returns the responses.
func postAll(t *testing.T, h *harness, n, maxTokens int) []*http.Response {
	t.Helper()
	resps := make([]*http.Response, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			req, err := http.NewRequest(http.MethodPost, h.base+"/v1/chat/completions", strings.NewReader(chatStreamFor(maxTokens)))
			if err != nil {
				errs[i] = err
				return
			}
			req.Header.Set("Content-Type", "application/json")
			<-start
			resps[i], errs[i] = h.clients["h3"].Do(req)
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		t.Cleanup(func() { resps[i].Body.Close() })
	}
	return resps
}

// admittedOf returns the responses with status 200 and checks that every
// other one is a tokens_per_minute refusal.
func admittedOf(t *testing.T, resps []*http.Response, policy string) []*http.Response {
	t.Helper()
	var admitted []*http.Response
	for _, resp := range resps {
		if resp.StatusCode == http.StatusOK {
			admitted = append(admitted, resp)
			continue
		}
		checkRefusal(t, resp, policy)
	}
	return admitted
}

// tokensReceived reads the streams all at once, as a client multiplexing
// them would (one at a time, the QUIC connection's flow-control window
// fills with the others' bytes), and counts their tokens.
func tokensReceived(t *testing.T, resps []*http.Response) int {
	t.Helper()
	bodies := make([][]byte, len(resps))
	errs := make([]error, len(resps))
	var wg sync.WaitGroup
	for i, resp := range resps {
		wg.Go(func() { bodies[i], errs[i] = io.ReadAll(resp.Body) })
	}
	wg.Wait()
	n := 0
	for i, b := range bodies {
		if errs[i] != nil {
			t.Fatalf("stream %d: %v", i, errs[i])
		}
		n += tokensIn(sseEvents(t, bytes.NewReader(b)))
	}
	return n
}

// TestTokensPerMinuteConcurrentStreams sends 50 streaming requests at once
// against a tokens-per-minute limit, in memory and in Redis: the tokens the
// tenant receives never exceed the burst by more than one request's
// reservation, and the reservations the streams did not use come back for
// the next 50.
func TestTokensPerMinuteConcurrentStreams(t *testing.T) {
	const (
		streams   = 50
		maxTokens = 100
		burst     = 500
		policy    = `"tokens_per_minute";q=500;w=5000`
	)
	for _, name := range []string{"local", "redis"} {
		t.Run(name, func(t *testing.T) {
			var store LimitStore // nil: the gateway's own local store
			var client *redis.Client
			if name == "redis" {
				client = redistest.Start(t)
				store = ratelimit.NewRedis(client, "h3infer:rl:")
			}
			// 0.1 tokens a second: what refills during the test is
			// far less than one request's reservation.
			h := newHarness(t, func(c *Config) {
				c.RateLimits = RateLimits{Default: TenantLimit{TokensPerMinute: 6, TokenBurst: burst}, Store: store}
			})
			t.Cleanup(func() {
				h.closeClients()
				if client != nil {
					client.Close()
				}
			})

			// First 50: the admitted streams send 10 tokens and stay
			// open, holding their reservations, until all 50 are
			// decided.
			h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
				evs := longAnswer(10)
				return evs[:len(evs)-1], nil
			})
			admitted := admittedOf(t, postAll(t, h, streams, maxTokens), policy)
			if got := len(admitted) * maxTokens; got > burst+maxTokens {
				t.Errorf("%d streams admitted reserving %d tokens, more than the burst of %d and one request's %d", len(admitted), got, burst, maxTokens)
			}
			if len(admitted) != burst/maxTokens {
				t.Errorf("%d of %d streams admitted, want %d", len(admitted), streams, burst/maxTokens)
			}
			h.sched.mu.Lock()
			open := slices.Clone(h.sched.streams)
			h.sched.mu.Unlock()
			// Ended while their bodies are read: a stream whose
			// client reads nothing may not take its last event.
			var ends sync.WaitGroup
			for _, st := range open {
				ends.Go(func() {
					st.events <- done(infer.FinishStop, 3, 10)
					close(st.events)
				})
			}
			received := tokensReceived(t, admitted)
			ends.Wait()

			// Each gave back the 90 it did not use: 450 are free, four
			// requests' worth. These run to their end.
			h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return longAnswer(maxTokens), nil })
			admitted = admittedOf(t, postAll(t, h, streams, maxTokens), policy)
			if len(admitted) != 4 {
				t.Errorf("after the first streams ended: %d of %d admitted, want 4", len(admitted), streams)
			}
			received += tokensReceived(t, admitted)
			if received > burst+maxTokens {
				t.Errorf("the tenant received %d tokens, more than the burst of %d and one request's %d", received, burst, maxTokens)
			}
			if want := 5*10 + len(admitted)*maxTokens; received != want {
				t.Errorf("received %d tokens, want %d", received, want)
			}
		})
	}
}

// TestTokensPerMinuteAcrossReload: a request keeps the limiter, and so the
// store, it was admitted under. Its unused tokens go back there, not to
// the store a reload swapped in meanwhile.
func TestTokensPerMinuteAcrossReload(t *testing.T) {
	first, second := ratelimit.NewLocal(), ratelimit.NewLocal()
	limits := func(store LimitStore) RateLimits {
		return RateLimits{Default: TenantLimit{TokensPerMinute: 6, TokenBurst: 100}, Store: store}
	}
	h := newHarness(t, func(c *Config) { c.RateLimits = limits(first) })
	status := func(maxTokens int) int {
		t.Helper()
		resp := h.post(t, "h3", "/v1/chat/completions", chatStreamFor(maxTokens))
		io.Copy(io.Discard, resp.Body)
		return resp.StatusCode
	}
	// Admitted under the first store, holding all of it, 10 tokens sent.
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
		evs := longAnswer(10)
		return evs[:len(evs)-1], nil
	})
	held := h.post(t, "h3", "/v1/chat/completions", chatStreamFor(100))
	if held.StatusCode != http.StatusOK {
		t.Fatalf("held stream: status %d", held.StatusCode)
	}
	if err := h.gw.SetRateLimits(limits(second)); err != nil {
		t.Fatal(err)
	}
	// The second store's bucket is spent whole.
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return longAnswer(100), nil })
	if s := status(100); s != http.StatusOK {
		t.Fatalf("first request under the new store: status %d", s)
	}
	h.sched.mu.Lock()
	st := h.sched.streams[0]
	h.sched.mu.Unlock()
	st.events <- done(infer.FinishStop, 3, 10)
	close(st.events)
	if got := tokensIn(sseEvents(t, held.Body)); got != 10 {
		t.Fatalf("held stream sent %d tokens, want 10", got)
	}
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return longAnswer(1), nil })
	if s := status(1); s != http.StatusTooManyRequests {
		t.Errorf("the held stream's 90 went to the store it was not admitted under: status %d, want 429", s)
	}
	if err := h.gw.SetRateLimits(limits(first)); err != nil {
		t.Fatal(err)
	}
	if s := status(90); s != http.StatusOK {
		t.Errorf("the held stream's 90 did not come back to its own store: status %d, want 200", s)
	}
}

// TestTokensPerMinuteTakesTheBackendsCount: a backend whose events carry
// fewer tokens than it generated (an upstream that put several tokens in
// one chunk) says so in its Done; the reservation gives back only what
// that count left unused.
func TestTokensPerMinuteTakesTheBackendsCount(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.RateLimits.Default = TenantLimit{TokensPerMinute: 6, TokenBurst: 100}
	})
	const policy = `"tokens_per_minute";q=100;w=1000`
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
		return []infer.Event{
			{Token: infer.Token{Count: 1, Text: "several "}},
			{Token: infer.Token{Count: 1, Text: "tokens"}},
			{Done: &infer.Done{FinishReason: infer.FinishLength, CompletionTokens: 60}},
		}, nil
	})
	resp := h.post(t, "h3", "/v1/chat/completions", chatStreamFor(100))
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200", resp.StatusCode)
	}
	// 60 used by the backend's count: 40 came back, not 98.
	checkRefusal(t, h.post(t, "h3", "/v1/chat/completions", chatStreamFor(41)), policy)
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return longAnswer(40), nil })
	resp = h.post(t, "h3", "/v1/chat/completions", chatStreamFor(40))
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("max_tokens 40 after 40 came back: status %d, want 200", resp.StatusCode)
	}
}
