package gateway

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"

	"github.com/quic-go/quic-go"

	"h3infer/config"
	"h3infer/priority"
	"h3infer/scheduler"
	"h3infer/tlsbind"
)

// AuthConfig configures tokens, connection binding and the 0-RTT guard.
type AuthConfig struct {
	// Disabled serves every request without a token. Auth is on unless this
	// is set.
	Disabled bool
	// Tokens verifies bearer tokens. Required unless Disabled.
	Tokens *tlsbind.Verifier
	// Replay checks early proofs. Default: an in-memory strike register
	// with tlsbind.DefaultWindow.
	Replay *tlsbind.ReplayGuard
	// Tickets makes 0-RTT tickets single-use. Default: this process
	// alone (a name of its own), sharing Replay's in-memory register.
	Tickets *tlsbind.Tickets
	// Disable0RTT turns 0-RTT off on the QUIC listener.
	Disable0RTT bool
	// EarlyData maps a route path (one of EarlyDataRoutes) to its policy
	// for early requests; unlisted routes get defaultEarlyPolicy.
	EarlyData map[string]tlsbind.EarlyPolicy
	// TrustedProxies are the peers whose Early-Data: 1 header (RFC 8470)
	// is believed: intermediaries that terminate TLS, forward early data
	// and say so. They are matched against the connection's own peer
	// address, never against a header. From any other peer the header is
	// ignored and counted; a direct client's early data is known from its
	// connection alone. Default: none.
	TrustedProxies []netip.Prefix
}

// ValidateEarlyData reports every entry of policies that names no route
// (EarlyDataRoutes) or no policy, each under key: the name the caller's
// configuration gives the map (the file's zero_rtt.routes, say).
func ValidateEarlyData(key string, policies map[string]tlsbind.EarlyPolicy) []error {
	var errs []error
	routes := EarlyDataRoutes()
	for _, path := range slices.Sorted(maps.Keys(policies)) {
		if !slices.Contains(routes, path) {
			errs = append(errs, fmt.Errorf("%s[%q]: not a route; routes are %s", key, path, strings.Join(routes, ", ")))
		}
		if _, err := tlsbind.ParseEarlyPolicy(string(policies[path])); err != nil {
			errs = append(errs, fmt.Errorf("%s[%q]: %w", key, path, err))
		}
	}
	return errs
}

// ParseTrustedProxy reads one of AuthConfig.TrustedProxies as a
// configuration file writes it: a prefix in its masked form
// ("10.0.0.0/8"), or a single address.
func ParseTrustedProxy(s string) (netip.Prefix, error) {
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return p, fmt.Errorf("want a CIDR prefix or an address, got %q", s)
		}
		if p != p.Masked() {
			return p, fmt.Errorf("%q has host bits set; write %s", s, p.Masked())
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return p, fmt.Errorf("want a CIDR prefix or an address, got %q", s)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if p.Addr().Is4In6() {
		// Peers are compared in their IPv4 form.
		return p, fmt.Errorf("%q is an IPv4-mapped IPv6 address; write it as IPv4", s)
	}
	return p, nil
}

// QUICKeys are quic.Transport secrets shared between instances.
type QUICKeys struct {
	TokenGenerator [32]byte
	StatelessReset [32]byte
}

// EarlyDataHeader says on a response that the gateway served its request
// before the TLS handshake completed.
const EarlyDataHeader = "H3infer-Early-Data"

// defaultEarlyPolicy: safe reads are served early, inference waits unless
// it carries a proof.
func defaultEarlyPolicy(path string) tlsbind.EarlyPolicy {
	switch path {
	case "/v1/chat/completions", "/v1/completions", "/v1/embeddings":
		return tlsbind.EarlyProofOrWait
	}
	return tlsbind.EarlyServe
}

// Errors of the guard; apiErrorOf maps them.
var (
	errTooEarly = errors.New("this request may not be served in early data; retry after the handshake")
	errNoScope  = errors.New("the token does not allow this model")
	// errProxiedBinding: an intermediary terminated the client's TLS, so
	// the exporter the gateway sees is the intermediary's.
	errProxiedBinding = fmt.Errorf("%w: it cannot be verified through an intermediary", tlsbind.ErrNoBinding)
)

type tokenKey struct{}

// tokenOf is the verified token of a request, nil with auth disabled.
func tokenOf(ctx context.Context) *tlsbind.Token {
	t, _ := ctx.Value(tokenKey{}).(*tlsbind.Token)
	return t
}

// identify checks that the request's token allows the model and returns
// the token's urgency ceiling (0: none) for the scheduler to apply. The
// token's tenant reaches the scheduler through Config.Tenant (tokenTenant).
func identify(ctx context.Context, model string) (urgencyCeiling priority.Urgency, err error) {
	t := tokenOf(ctx)
	if t == nil {
		return 0, nil
	}
	if !t.AllowsModel(model) {
		return 0, errNoScope
	}
	if c := t.UrgencyCeiling; c != nil {
		return priority.Urgency(*c), nil
	}
	return 0, nil
}

// tokenTenant is the default Config.Tenant: the tenant the request's token
// names, or the scheduler's default tenant when auth is off.
func tokenTenant(r *http.Request) string {
	if t := tokenOf(r.Context()); t != nil && t.Tenant != "" {
		return t.Tenant
	}
	return scheduler.DefaultTenant
}

// guard authenticates a request and applies the route's early-data policy
// before next runs.
func (g *Gateway) guard(path string, next http.HandlerFunc) http.HandlerFunc {
	policy, ok := g.cfg.Auth.EarlyData[path]
	if !ok {
		policy = defaultEarlyPolicy(path)
	}
	return func(w http.ResponseWriter, r *http.Request) {
		if g.cfg.Auth.Disabled {
			next(w, r)
			return
		}
		tok, err := g.cfg.Auth.Tokens.Verify(bearerOf(r))
		if err != nil {
			g.metrics.authFailures.WithLabelValues(authReason(err)).Inc()
			writeError(w, err)
			return
		}
		conn := quicConn(r.Context())
		early := conn != nil && !handshakeDone(conn)
		viaProxy := g.earlyDataHeader(r, conn)
		if early || viaProxy {
			served, err := g.earlyGate(w, r, policy, tok, conn, viaProxy)
			if err != nil {
				writeError(w, err)
				return
			}
			early = served
		}
		if early {
			w.Header().Set(EarlyDataHeader, "1")
		} else if err := g.checkBinding(r, conn, tok); err != nil {
			writeError(w, err)
			return
		}
		markAuthenticated(r.Context())
		next(w, r.WithContext(context.WithValue(r.Context(), tokenKey{}, tok)))
	}
}

// earlyDataHeader reports whether a configured intermediary marked the
// request Early-Data: 1 (RFC 8470): it forwarded early data, and the
// gateway cannot wait on a handshake it is not party to. From any other
// peer the header is only a client's say-so, which would let it choose the
// early path: it is counted and removed.
func (g *Gateway) earlyDataHeader(r *http.Request, conn *quic.Conn) bool {
	if _, ok := r.Header["Early-Data"]; !ok {
		return false
	}
	if !g.trustedPeer(r, conn) {
		g.metrics.earlyHeaderIgnored.Inc()
		r.Header.Del("Early-Data")
		return false
	}
	return r.Header.Get("Early-Data") == "1"
}

// trustedPeer reports whether the connection's peer is in
// AuthConfig.TrustedProxies.
func (g *Gateway) trustedPeer(r *http.Request, conn *quic.Conn) bool {
	if len(g.cfg.Auth.TrustedProxies) == 0 {
		return false
	}
	var peer netip.Addr
	if conn != nil {
		ua, ok := conn.RemoteAddr().(*net.UDPAddr)
		if !ok {
			return false
		}
		peer = ua.AddrPort().Addr()
	} else {
		// Set by net/http from the accepted TCP connection.
		ap, err := netip.ParseAddrPort(r.RemoteAddr)
		if err != nil {
			return false
		}
		peer = ap.Addr()
	}
	peer = peer.Unmap().WithZone("")
	for _, p := range g.cfg.Auth.TrustedProxies {
		if p.Contains(peer) {
			return true
		}
	}
	return false
}

// earlyGate decides an early request's fate. It reports whether the
// request is served as early data; false means the handshake completed
// while it waited.
//
// A bind=required token is served early only on a direct connection with
// a valid, unused early proof, on a route whose policy serves early
// requests (serve or proof). The proof is keyed by the token's secret like
// the binding proof it stands in for, so whoever lifted the bearer token
// alone cannot make one; everything else is refused.
func (g *Gateway) earlyGate(w http.ResponseWriter, r *http.Request, policy tlsbind.EarlyPolicy, tok *tlsbind.Token, conn *quic.Conn, viaProxy bool) (bool, error) {
	outcome := g.metrics.early
	proof := r.Header.Get(tlsbind.EarlyProofHeader)
	bound := tok.Bind == tlsbind.BindRequired
	switch {
	case bound && viaProxy:
		// 401, not 425: after a 425 the intermediary would retry once its
		// client's handshake completed, and the retry would still carry
		// a proof for the client's connection to the intermediary, which
		// the exporter of the intermediary's connection here can never
		// match. Refusing now says what is wrong; a bind=required token
		// cannot be used through an intermediary that terminates TLS.
		outcome.WithLabelValues("rejected").Inc()
		g.metrics.binding.WithLabelValues("failed").Inc()
		return false, errProxiedBinding
	case bound && (proof == "" || policy == tlsbind.EarlyWait || policy == tlsbind.EarlyReject):
		// Its headers cannot carry a binding proof (the client has no
		// exporter yet), and waiting would only end in 401: 425 lets
		// the client retry in 1-RTT with its proof.
		outcome.WithLabelValues("rejected").Inc()
		return false, errTooEarly
	case policy == tlsbind.EarlyServe && !bound:
		outcome.WithLabelValues("accepted").Inc()
		return true, nil
	case proof != "" && (policy == tlsbind.EarlyProofOrWait || policy == tlsbind.EarlyServe):
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, g.cfg.MaxBodyBytes))
		if err != nil {
			return false, err
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		if err := g.cfg.Auth.Replay.Check(r.Context(), tok.Secret, proof, r.Method, r.URL.Path, body); err != nil {
			if errors.Is(err, tlsbind.ErrReplayed) {
				outcome.WithLabelValues("replay_blocked").Inc()
			} else {
				outcome.WithLabelValues("rejected").Inc()
			}
			return false, err
		}
		outcome.WithLabelValues("accepted").Inc()
		return true, nil
	case policy == tlsbind.EarlyReject || viaProxy || conn == nil:
		outcome.WithLabelValues("rejected").Inc()
		return false, errTooEarly
	}
	outcome.WithLabelValues("waited").Inc()
	select {
	case <-conn.HandshakeComplete():
		return false, nil
	case <-r.Context().Done():
		return false, r.Context().Err()
	}
}

// checkBinding verifies the exporter-bound proof of a 1-RTT request; a
// token marked bind=required must carry one.
func (g *Gateway) checkBinding(r *http.Request, conn *quic.Conn, tok *tlsbind.Token) error {
	header := r.Header.Get(tlsbind.BindingHeader)
	if header == "" && tok.Bind != tlsbind.BindRequired {
		return nil
	}
	exporter, err := exporterOf(r, conn)
	if err == nil {
		err = tlsbind.VerifyBinding(tok.Secret, exporter, header)
	}
	if err != nil {
		g.metrics.binding.WithLabelValues("failed").Inc()
		if !errors.Is(err, tlsbind.ErrNoBinding) {
			err = tlsbind.ErrBadBinding
		}
		return err
	}
	g.metrics.binding.WithLabelValues("ok").Inc()
	return nil
}

// exporterOf computes the connection's RFC 9266 exporter value.
func exporterOf(r *http.Request, conn *quic.Conn) ([]byte, error) {
	if conn != nil {
		cs := conn.ConnectionState().TLS
		return cs.ExportKeyingMaterial(tlsbind.ExporterLabel, nil, tlsbind.ExporterLen)
	}
	if r.TLS == nil {
		return nil, errors.New("no TLS connection")
	}
	return r.TLS.ExportKeyingMaterial(tlsbind.ExporterLabel, nil, tlsbind.ExporterLen)
}

func handshakeDone(c *quic.Conn) bool {
	select {
	case <-c.HandshakeComplete():
		return true
	default:
		return false
	}
}

func bearerOf(r *http.Request) string {
	h := r.Header.Get("Authorization")
	if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	return ""
}

// authReason is a bounded label for h3infer_auth_failures_total.
func authReason(err error) string {
	for _, c := range []struct {
		err    error
		reason string
	}{
		{tlsbind.ErrNoToken, "missing"},
		{tlsbind.ErrExpired, "expired"},
		{tlsbind.ErrNotYetValid, "not_yet_valid"},
		{tlsbind.ErrWrongAudience, "audience"},
		{tlsbind.ErrUnknownKey, "unknown_key"},
		{tlsbind.ErrBadSignature, "signature"},
	} {
		if errors.Is(err, c.err) {
			return c.reason
		}
	}
	return "malformed"
}

// defaultAuth fills the guard's defaults: an in-memory strike register
// shared by proofs and tickets.
func defaultAuth(a *AuthConfig, g *Gateway) error {
	if a.Disabled {
		return nil
	}
	var mem *tlsbind.MemoryStrikes
	if a.Replay == nil {
		mem = tlsbind.NewMemoryStrikes()
		rg, err := tlsbind.NewReplayGuard(mem, 0)
		if err != nil {
			return err
		}
		a.Replay = rg
	}
	if a.Tickets == nil {
		if mem == nil {
			return errors.New("gateway.auth: tickets must be set when the replay guard is")
		}
		t, err := tlsbind.NewTickets(tlsbind.TicketConfig{
			Strikes:    mem,
			Window:     config.Duration(a.Replay.Window()),
			Registerer: g.cfg.Registry,
		}, g.log)
		if err != nil {
			return err
		}
		a.Tickets = t
	}
	return nil
}
