package gateway

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"h3infer/client"
	"h3infer/config"
	"h3infer/tlsbind"
)

func testKeys(t testing.TB) (*tlsbind.KeyRing, *tlsbind.Verifier) {
	t.Helper()
	ring, err := tlsbind.EnsureKeyRing(t.TempDir()+"/keys.json", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	v, err := tlsbind.NewVerifier(ring, "")
	if err != nil {
		t.Fatal(err)
	}
	return ring, v
}

// issue signs claims valid for an hour unless they say otherwise.
func (h *harness) issue(t testing.TB, c tlsbind.Claims) string {
	t.Helper()
	now := time.Now()
	if c.Audience == "" {
		c.Audience = tlsbind.DefaultAudience
	}
	if c.Expires == 0 {
		c.IssuedAt, c.NotBefore, c.Expires = now.Unix(), now.Unix()-1, now.Add(time.Hour).Unix()
	}
	cred, err := h.ring.Issue(c)
	if err != nil {
		t.Fatal(err)
	}
	return cred
}

func bearerOfCredential(t testing.TB, cred string) string {
	t.Helper()
	b, _, err := tlsbind.SplitCredential(cred)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// withBearer adds Authorization to requests that do not set it.
func withBearer(bearer string, next http.RoundTripper) http.RoundTripper {
	return roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if _, set := r.Header["Authorization"]; !set {
			r = r.Clone(r.Context())
			r.Header.Set("Authorization", "Bearer "+bearer)
		}
		return next.RoundTrip(r)
	})
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func (h *harness) client(t *testing.T, cred string, dialAddr string) *client.Client {
	t.Helper()
	return h.clientWithCache(t, cred, dialAddr, nil)
}

// clientWithCache is client with a session cache of the test's own (nil:
// the client's default).
func (h *harness) clientWithCache(t *testing.T, cred, dialAddr string, cache tls.ClientSessionCache) *client.Client {
	t.Helper()
	c, err := client.New(client.Config{TLS: &tls.Config{RootCAs: h.pool, ClientSessionCache: cache}, Credential: cred, DialAddr: dialAddr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func errorCode(t *testing.T, resp *http.Response) string {
	t.Helper()
	var e struct {
		Error errorObject `json:"error"`
	}
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("error body %q: %v", b, err)
	}
	return deref(e.Error.Code)
}

func TestTokenRefusals(t *testing.T) {
	h := newHarness(t, nil)
	now := time.Now()
	other, _ := testKeys(t)
	otherCred, err := other.Issue(tlsbind.Claims{Tenant: "x", Audience: tlsbind.DefaultAudience, Expires: now.Add(time.Hour).Unix()})
	if err != nil {
		t.Fatal(err)
	}
	good := bearerOfCredential(t, h.cred)
	f := strings.Split(good, ".")
	cases := map[string]struct {
		auth   string
		status int
		code   string
	}{
		"missing":           {"", 401, "missing_token"},
		"not bearer":        {"Basic abc", 401, "missing_token"},
		"garbage":           {"Bearer nonsense", 401, "invalid_token"},
		"expired":           {"Bearer " + bearerOfCredential(t, h.issue(t, tlsbind.Claims{Tenant: "a", IssuedAt: now.Add(-2 * time.Hour).Unix(), Expires: now.Add(-time.Hour).Unix()})), 401, "invalid_token"},
		"not yet valid":     {"Bearer " + bearerOfCredential(t, h.issue(t, tlsbind.Claims{Tenant: "a", NotBefore: now.Add(time.Hour).Unix(), Expires: now.Add(2 * time.Hour).Unix()})), 401, "invalid_token"},
		"wrong audience":    {"Bearer " + bearerOfCredential(t, h.issue(t, tlsbind.Claims{Tenant: "a", Audience: "elsewhere"})), 401, "invalid_token"},
		"unknown key id":    {"Bearer " + bearerOfCredential(t, otherCred), 401, "invalid_token"},
		"bad signature":     {"Bearer " + f[0] + "." + f[1] + "." + f[2] + "." + strings.Repeat("A", len(f[3])), 401, "invalid_token"},
		"secret sent":       {"Bearer " + h.cred, 401, "invalid_token"},
		"model not allowed": {"Bearer " + bearerOfCredential(t, h.issue(t, tlsbind.Claims{Tenant: "a", Models: []string{"other"}})), 403, "model_not_allowed"},
		"valid":             {"Bearer " + good, 200, ""},
	}
	for name, tc := range cases {
		for _, proto := range []string{"h3", "h2"} {
			t.Run(name+"/"+proto, func(t *testing.T) {
				resp := h.post(t, proto, "/v1/chat/completions", chat(""), "Authorization", tc.auth)
				if tc.auth == "" {
					req, _ := http.NewRequest(http.MethodPost, h.base+"/v1/chat/completions", strings.NewReader(chat("")))
					req.Header["Authorization"] = []string{""}
					resp = h.do(t, proto, req)
				}
				if resp.StatusCode != tc.status {
					t.Fatalf("status %d, want %d", resp.StatusCode, tc.status)
				}
				if tc.status == 200 {
					return
				}
				if got := errorCode(t, resp); got != tc.code {
					t.Errorf("code %q, want %q", got, tc.code)
				}
				if wa := resp.Header.Get("WWW-Authenticate"); !strings.HasPrefix(wa, `Bearer realm="h3infer"`) {
					t.Errorf("WWW-Authenticate %q, want a Bearer challenge", wa)
				}
			})
		}
	}
}

func TestTokenNamesTenantAndCapsUrgency(t *testing.T) {
	h := newHarness(t, nil)
	ceiling := uint8(4)
	cred := h.issue(t, tlsbind.Claims{Tenant: "acme", UrgencyCeiling: &ceiling})
	resp := h.post(t, "h3", "/v1/chat/completions", chat(""), "Authorization", "Bearer "+bearerOfCredential(t, cred), "Priority", "u=1")
	io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	r, _ := h.sched.last()
	// The scheduler applies the ceiling together with the tenant's own.
	if r.Tenant != "acme" || r.UrgencyCeiling != 4 || r.Urgency != 1 {
		t.Errorf("scheduler got tenant %q urgency %d ceiling %d, want acme, 1 as asked and ceiling 4", r.Tenant, r.Urgency, r.UrgencyCeiling)
	}
}

// rawH3 opens an HTTP/3 connection without the client package, waiting
// for the handshake.
func (h *harness) rawH3(t *testing.T) (*quic.Conn, *http3.ClientConn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, h.gw.Addr(), &tls.Config{RootCAs: h.pool, NextProtos: []string{http3.NextProtoH3}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http3.Transport{}
	t.Cleanup(func() { qc.CloseWithError(0, ""); tr.Close() })
	return qc, tr.NewClientConn(qc)
}

func TestBinding(t *testing.T) {
	h := newHarness(t, nil)
	cred := h.issue(t, tlsbind.Claims{Tenant: "native", Bind: tlsbind.BindRequired})
	bearer, secret, err := tlsbind.SplitCredential(cred)
	if err != nil {
		t.Fatal(err)
	}
	qa, ca := h.rawH3(t)
	_, cb := h.rawH3(t)
	cs := qa.ConnectionState().TLS
	expA, err := cs.ExportKeyingMaterial(tlsbind.ExporterLabel, nil, tlsbind.ExporterLen)
	if err != nil {
		t.Fatal(err)
	}
	proofA := tlsbind.BindingProof(secret, expA)
	send := func(cc *http3.ClientConn, proof string) *http.Response {
		req, _ := http.NewRequest(http.MethodGet, h.base+"/v1/models", nil)
		req.Header.Set("Authorization", "Bearer "+bearer)
		if proof != "" {
			req.Header.Set(tlsbind.BindingHeader, proof)
		}
		resp, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	if resp := send(ca, proofA); resp.StatusCode != 200 {
		t.Errorf("valid proof on its own connection: %d, want 200", resp.StatusCode)
	}
	if resp := send(cb, proofA); resp.StatusCode != 401 || errorCode(t, resp) != "binding_failed" {
		t.Errorf("proof lifted onto another connection: %d, want 401 binding_failed", resp.StatusCode)
	}
	if resp := send(cb, ""); resp.StatusCode != 401 || errorCode(t, resp) != "binding_failed" {
		t.Errorf("bind=required without proof: %d, want 401 binding_failed", resp.StatusCode)
	}
	// The client package binds by itself.
	c := h.client(t, cred, "")
	res, err := c.Do(context.Background(), http.MethodPost, h.base+"/v1/chat/completions", nil, []byte(chat("")))
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Errorf("client package with bind=required: %d, want 200", res.StatusCode)
	}
	ok, failed := h.counter(t, "h3infer_token_binding_total", "ok"), h.counter(t, "h3infer_token_binding_total", "failed")
	if ok != 2 || failed != 2 {
		t.Errorf("binding metrics ok=%v failed=%v, want 2 and 2", ok, failed)
	}
}

// counter reads one labelled counter from the gateway's registry; an
// empty label sums the whole family.
func (h *harness) counter(t *testing.T, name, label string) float64 {
	t.Helper()
	mfs, err := h.gw.cfg.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if label == "" {
				sum += m.GetCounter().GetValue()
			}
			for _, l := range m.GetLabel() {
				if l.GetValue() == label {
					sum += m.GetCounter().GetValue()
				}
			}
		}
	}
	return sum
}

// boundGET sends GET /v1/models with the bearer of cred (a bind=required
// token) on its own HTTP/3 connection, with the connection's binding proof
// when bind is set, and the extra header pairs.
func (h *harness) boundGET(t *testing.T, cred string, bind bool, header ...string) *http.Response {
	t.Helper()
	bearer, secret, err := tlsbind.SplitCredential(cred)
	if err != nil {
		t.Fatal(err)
	}
	qc, cc := h.rawH3(t)
	req, _ := http.NewRequest(http.MethodGet, h.base+"/v1/models", nil)
	req.Header.Set("Authorization", "Bearer "+bearer)
	if bind {
		cs := qc.ConnectionState().TLS
		exp, err := cs.ExportKeyingMaterial(tlsbind.ExporterLabel, nil, tlsbind.ExporterLen)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set(tlsbind.BindingHeader, tlsbind.BindingProof(secret, exp))
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := cc.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// TestEarlyDataHeaderFromClient: a client that sends Early-Data: 1 itself
// gets nothing for it. It used to skip the binding check of a bind=required
// token, which made a lifted one usable without its secret.
func TestEarlyDataHeaderFromClient(t *testing.T) {
	for name, proxies := range map[string][]netip.Prefix{
		"no trusted proxies":       nil,
		"peer outside the proxies": {netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("::1/128")},
	} {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t, func(c *Config) {
				c.Auth.TrustedProxies = proxies
				c.Auth.EarlyData = map[string]tlsbind.EarlyPolicy{"/v1/chat/completions": tlsbind.EarlyServe}
			})
			bound := h.issue(t, tlsbind.Claims{Tenant: "native", Bind: tlsbind.BindRequired})
			bearer := "Bearer " + bearerOfCredential(t, bound)
			for _, proto := range []string{"h3", "h2"} {
				req, _ := http.NewRequest(http.MethodGet, h.base+"/v1/models", nil)
				req.Header.Set("Authorization", bearer)
				req.Header.Set("Early-Data", "1")
				if resp := h.do(t, proto, req); resp.StatusCode != 401 || errorCode(t, resp) != "binding_failed" {
					t.Errorf("%s: lifted bind=required token, GET /v1/models with Early-Data: 1: %d, want 401 binding_failed", proto, resp.StatusCode)
				}
				resp := h.post(t, proto, "/v1/chat/completions", chat(""), "Authorization", bearer, "Early-Data", "1")
				if resp.StatusCode != 401 || errorCode(t, resp) != "binding_failed" {
					t.Errorf("%s: lifted bind=required token, completion (policy serve) with Early-Data: 1: %d, want 401 binding_failed", proto, resp.StatusCode)
				}
				// A bind=optional token is served as an ordinary 1-RTT
				// request: not marked early.
				req, _ = http.NewRequest(http.MethodGet, h.base+"/v1/models", nil)
				req.Header.Set("Early-Data", "1")
				if resp := h.do(t, proto, req); resp.StatusCode != 200 || resp.Header.Get(EarlyDataHeader) != "" {
					t.Errorf("%s: bind=optional with Early-Data: 1: %d early=%q, want 200 not early", proto, resp.StatusCode, resp.Header.Get(EarlyDataHeader))
				}
			}
			// The token's holder, binding its connection, still gets in,
			// header or not.
			if resp := h.boundGET(t, bound, true, "Early-Data", "1"); resp.StatusCode != 200 {
				t.Errorf("bind=required with its binding proof and Early-Data: 1: %d, want 200", resp.StatusCode)
			}
			if got := h.counter(t, "h3infer_early_data_header_ignored_total", ""); got != 7 {
				t.Errorf("ignored Early-Data headers = %v, want 7", got)
			}
			if got := h.counter(t, "h3infer_early_data_requests_total", "accepted"); got != 0 {
				t.Errorf("early accepted = %v, want 0", got)
			}
		})
	}
}

// TestEarlyDataHeaderFromIntermediary: a configured intermediary's
// Early-Data: 1 is believed (RFC 8470), but a bind=required token cannot be
// verified through it and is refused.
func TestEarlyDataHeaderFromIntermediary(t *testing.T) {
	// A short window: a fresh in-memory register refuses early proofs for
	// two windows after start-up.
	const window = time.Second
	h := newHarness(t, func(c *Config) {
		strikes := tlsbind.NewMemoryStrikes()
		rg, err := tlsbind.NewReplayGuard(strikes, window)
		if err != nil {
			t.Fatal(err)
		}
		tk, err := tlsbind.NewTickets(tlsbind.TicketConfig{Strikes: strikes, Window: config.Duration(window), Registerer: c.Registry}, discardLog())
		if err != nil {
			t.Fatal(err)
		}
		c.Auth.Replay, c.Auth.Tickets = rg, tk
		c.Auth.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	})
	time.Sleep(tlsbind.WarmUp(window) + 100*time.Millisecond)
	resp := h.post(t, "h2", "/v1/chat/completions", chat(""), "Early-Data", "1")
	if resp.StatusCode != http.StatusTooEarly || errorCode(t, resp) != "too_early" {
		t.Errorf("inference marked Early-Data: 1 without proof: %d, want 425", resp.StatusCode)
	}
	for _, proto := range []string{"h2", "h3"} {
		req, _ := http.NewRequest(http.MethodGet, h.base+"/v1/models", nil)
		req.Header.Set("Early-Data", "1")
		if resp := h.do(t, proto, req); resp.StatusCode != 200 || resp.Header.Get(EarlyDataHeader) != "1" {
			t.Errorf("%s: GET /v1/models marked Early-Data: 1: %d, want 200 served early", proto, resp.StatusCode)
		}
	}
	// With a proof it is served, once.
	bearer, secret, _ := tlsbind.SplitCredential(h.cred)
	body := chat("")
	proof, err := tlsbind.NewEarlyProof(secret, time.Now(), http.MethodPost, "/v1/chat/completions", []byte(body))
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []int{200, http.StatusTooEarly} {
		resp := h.post(t, "h2", "/v1/chat/completions", body, "Early-Data", "1", tlsbind.EarlyProofHeader, proof, "Authorization", "Bearer "+bearer)
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != want {
			t.Errorf("proofed early request #%d: %d, want %d", i+1, resp.StatusCode, want)
		}
	}
	if got := h.counter(t, "h3infer_early_data_requests_total", "replay_blocked"); got != 1 {
		t.Errorf("replay_blocked = %v, want 1", got)
	}
	if got := h.counter(t, "h3infer_early_data_requests_total", "rejected"); got != 1 {
		t.Errorf("rejected = %v, want 1", got)
	}

	// The exporter here is the intermediary's connection's, so no proof
	// can bind a bind=required token: refused with or without one, and
	// with an early proof too.
	bound := h.issue(t, tlsbind.Claims{Tenant: "native", Bind: tlsbind.BindRequired})
	_, boundSecret, _ := tlsbind.SplitCredential(bound)
	early, _ := tlsbind.NewEarlyProof(boundSecret, time.Now(), http.MethodGet, "/v1/models", nil)
	for name, resp := range map[string]*http.Response{
		"no proof":      h.boundGET(t, bound, false, "Early-Data", "1"),
		"binding proof": h.boundGET(t, bound, true, "Early-Data", "1"),
		"early proof":   h.boundGET(t, bound, false, "Early-Data", "1", tlsbind.EarlyProofHeader, early),
	} {
		if resp.StatusCode != 401 || errorCode(t, resp) != "binding_failed" {
			t.Errorf("bind=required through the intermediary, %s: %d, want 401 binding_failed", name, resp.StatusCode)
		}
	}
	// Without the header (a 1-RTT request on its own connection) it works.
	if resp := h.boundGET(t, bound, true); resp.StatusCode != 200 {
		t.Errorf("bind=required with its binding proof, not early: %d, want 200", resp.StatusCode)
	}
	if got := h.counter(t, "h3infer_early_data_header_ignored_total", ""); got != 0 {
		t.Errorf("ignored Early-Data headers = %v, want 0 from a trusted peer", got)
	}
}

func chat(extra string) string {
	return `{"model":"demo","messages":[{"role":"user","content":"hi"}]` + extra + `}`
}

func discardLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// ticketSignal is a session cache that says when a ticket has been stored.
type ticketSignal struct {
	tls.ClientSessionCache
	got chan struct{}
}

func (c *ticketSignal) Put(key string, cs *tls.ClientSessionState) {
	c.ClientSessionCache.Put(key, cs)
	if cs != nil {
		select {
		case c.got <- struct{}{}:
		default:
		}
	}
}
