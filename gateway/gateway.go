package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/qlogwriter"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"h3infer/config"
	"h3infer/infer"
	"h3infer/scheduler"
)

// Dispatch is one dispatched request as the gateway consumes it.
// *scheduler.Dispatch satisfies it.
type Dispatch interface {
	ID() uint64
	Events() <-chan infer.Event
	Close()
}

// Scheduler admits requests. FromScheduler adapts *scheduler.Scheduler.
type Scheduler interface {
	Submit(ctx context.Context, r *scheduler.Request) (Dispatch, scheduler.Admission, error)
}

// FromScheduler lets the gateway use s: Go does not treat a method returning
// *scheduler.Dispatch as one returning Dispatch.
func FromScheduler(s *scheduler.Scheduler) Scheduler { return schedulerAdapter{s} }

type schedulerAdapter struct{ s *scheduler.Scheduler }

func (a schedulerAdapter) Submit(ctx context.Context, r *scheduler.Request) (Dispatch, scheduler.Admission, error) {
	st, adm, err := a.s.Submit(ctx, r)
	if err != nil {
		return nil, adm, err
	}
	return st, adm, nil
}

// Router picks the version of a model that serves one request (see
// workerpool.Registry): the version pinned by the client, else a weighted,
// sticky split by key. target is the name the workers know the version by;
// done must be called when the request ends.
type Router interface {
	Route(model, key, pin string) (target, version string, done func(failed bool), err error)
}

// ModelAdmin changes which model versions are loaded and routed; the admin
// listener serves it under /admin/models. Errors with a NotFound() bool
// method that returns true become 404, other errors 409.
type ModelAdmin interface {
	ModelStatus() any
	LoadVersion(ctx context.Context, model, version string) error
	UnloadVersion(ctx context.Context, model, version string) error
	Promote(ctx context.Context, model, version string) error
	Canary(ctx context.Context, model, version string, percent float64) error
	Rollback(ctx context.Context, model string) error
}

// Catalog says which models the backends serve, whether any backend is
// up, and what /debug/state shows of each kind of backend: JSON as it
// is, under the kind's own key ("workers": the worker processes'
// supervision state; "upstreams": each upstream server's health).
type Catalog interface {
	Models() []infer.ModelInfo
	Ready() bool
	BackendStates() map[string]any
}

// Config configures a Gateway. Zero values mean the documented defaults
// (WithDefaults). The fields with json tags are the configuration file's
// "gateway" section as it is written; the rest the command that runs the
// gateway wires in, from other sections or from what it built.
type Config struct {
	// Listen is the host:port served by HTTP/3 on UDP and by HTTP/1.1 and
	// HTTP/2 on TCP, the same port for both so that Alt-Svc can name it.
	// Port 0 picks a port free on both. Default 127.0.0.1:8443.
	Listen string `json:"-"`
	// Admin is the host:port of the plain-HTTP admin listener (/healthz,
	// /readyz, /metrics, /debug/state, /debug/pprof/). Port 0 picks a free
	// port. Default 127.0.0.1:9090. The listener answers only requests
	// whose Host is this address, the address bound, localhost or a
	// loopback IP with its port (any IP with its port when bound to the
	// unspecified address), or one of AdminHosts; it refuses requests a
	// browser marks as cross-origin, and POSTs under /admin/ that are not
	// application/json.
	Admin string `json:"-"`
	// AdminHosts are further host names the admin listener answers to, on
	// any port: the names a scraper or operator reaches it by. Default:
	// none.
	AdminHosts []string `json:"-"`
	// TLS holds the certificates. Required. The gateway clones it and sets
	// NextProtos per listener.
	TLS *tls.Config `json:"-"`
	// MaxBodyBytes bounds a request body; a larger one gets 413. At least
	// 1024. Default 1 MiB.
	MaxBodyBytes int64 `json:"max_body_bytes"`
	// DefaultMaxTokens caps generation when a request names no max_tokens.
	// Default 256.
	DefaultMaxTokens int `json:"default_max_tokens"`
	// MaxStreams is how many requests one client connection may have in
	// flight at once: the HTTP/3 bidirectional stream limit and HTTP/2's
	// concurrent streams. quic-go's own default of 100 made a client that
	// multiplexes more completions over one connection (a frontend, a
	// load generator) queue the rest on its side, where neither the
	// scheduler nor urgency can see them. 1..65536; default 1024.
	MaxStreams int `json:"max_streams"`
	// PreauthStreams is how many requests an HTTP/3 connection may have
	// in handlers until one of its requests has passed the auth guard;
	// MaxStreams applies after (and from the start with auth disabled).
	// More streams wait in quic-go, costing no goroutine. A browser opens
	// at most about 100 at once. 1..MaxStreams; default 100 or MaxStreams
	// if lower.
	PreauthStreams int `json:"preauth_streams"`
	// HeaderTimeout is how long a request may take to send its headers,
	// over HTTP/3 (per stream; a late one is reset) and over TCP (per
	// connection, net/http's ReadHeaderTimeout). Default 10s.
	HeaderTimeout config.Duration `json:"header_timeout"`
	// AuthTimeout is how long a client connection (HTTP/3 or TCP) may
	// stay open without one of its requests passing the auth guard; then
	// it is closed. Without it, connections that never authenticate and
	// keep themselves alive would hold MaxConnections' slots for good.
	// No deadline with auth disabled. Default 30s.
	AuthTimeout config.Duration `json:"auth_timeout"`
	// MaxConnections bounds the client connections of both listeners
	// together, HTTP/3 handshakes in progress included; past it a QUIC
	// connection is refused before its handshake (CONNECTION_REFUSED) and
	// a TCP one closed on accept. Default: DefaultMaxConnections().
	MaxConnections int `json:"max_connections"`
	// MaxIdleConnections bounds the idle HTTP/3 connections: those that
	// have served a request and have none running. Above it the gateway
	// closes the connections idle longest with H3_NO_ERROR (those whose
	// requests never passed the auth guard first), so that idle clients,
	// which resume in 0-RTT, do not fill MaxConnections and memory.
	// 1..MaxConnections; default three quarters of MaxConnections,
	// leaving the last quarter to new and running connections.
	MaxIdleConnections int `json:"max_idle_connections"`
	// MaxConnectionsPerSource bounds the connections of one source (an
	// IPv4 address, an IPv6 /64), counted once the address is proven.
	// 1..MaxConnections; default DefaultMaxConnectionsPerSource.
	MaxConnectionsPerSource int `json:"max_connections_per_source"`
	// QueueTimeout is each request's default deadline, counted from its
	// arrival: a request still queued then gets 504, one still streaming
	// gets an error event. At most MaxDeadline; default 30s. The file
	// calls it gateway.deadline.
	QueueTimeout config.Duration `json:"deadline"`
	// MaxDeadline caps the deadline a client may ask for in the
	// X-Request-Timeout header. Default 5m.
	MaxDeadline config.Duration `json:"max_deadline"`
	// Tenant names the tenant a request belongs to: the scheduler shares
	// workers between tenants by weight, and RateLimits applies per tenant.
	// Default: the tenant the request's token names (scheduler.DefaultTenant
	// without auth).
	Tenant func(*http.Request) string `json:"-"`
	// Coalesce shapes how the SSE writer batches tokens by the request's class.
	Coalesce CoalesceConfig `json:"coalesce"`
	// ShutdownGrace is how long streams in flight may run once shutdown
	// begins; those still running then end with an error event. It is the
	// deadline the caller gives Shutdown's context (and may change while
	// serving, as cmd/h3infer does on SIGHUP), so the gateway only checks
	// and defaults it. 0..10m; default 10s.
	ShutdownGrace config.Duration `json:"shutdown_grace"`
	// Registry receives the gateway's metrics and is served on /metrics.
	// Default: a registry of the gateway's own.
	Registry *prometheus.Registry `json:"-"`
	// Auth configures tokens and the 0-RTT guard; auth is on by default.
	Auth AuthConfig `json:"-"`
	// Router, when set, maps each request's model to a version. nil: the
	// model name goes to the workers as it is.
	Router Router `json:"-"`
	// Tokenizers, when set, serves POST /tokenize and /detokenize with
	// the tokenizer of the version a completion would run on; nil: those
	// routes answer 404.
	Tokenizers Tokenizers `json:"-"`
	// ModelAdmin, when set, is served on the admin listener.
	ModelAdmin ModelAdmin `json:"-"`
	// QUICKeys, when set, are shared with other instances so that each
	// accepts the others' address tokens and stateless resets. Default:
	// random per start.
	QUICKeys *QUICKeys `json:"-"`
	// TracerProvider makes the request spans. Default: a no-op provider, so
	// tracing costs nothing.
	TracerProvider trace.TracerProvider `json:"-"`
	// RateLimits limits each tenant. Default: no limits. The file has it
	// as a section of its own, rate_limits.
	RateLimits RateLimits `json:"-"`
	// AdminToken, when set, is required as "Authorization: Bearer <token>"
	// on every admin route but /healthz and /readyz. It is required when
	// Admin is not a loopback address.
	AdminToken string `json:"-"`
	// Status, when set, is served as JSON under "status" on /debug/state:
	// the wiring reports queues there. Workers come from the Catalog.
	Status func() any `json:"-"`
	// TCPProtos are ALPN protocols the TCP listener offers besides h2 and
	// http/1.1: certs.ACMEALPN when TLS's certificate source answers ACME's
	// tls-alpn-01 challenge. The certificate source must handle them.
	TCPProtos []string `json:"-"`
	// QUICTracer, when set, traces every QUIC connection: `serve --qlog`
	// writes qlog files through package qlogdir.
	QUICTracer func(context.Context, bool, quic.ConnectionID) qlogwriter.Trace `json:"-"`
}

// Defaults for Config's zero values.
const (
	DefaultListen         = "127.0.0.1:8443"
	DefaultAdmin          = "127.0.0.1:9090"
	DefaultMaxBodyBytes   = 1 << 20
	DefaultMaxTokens      = 256
	DefaultMaxStreams     = 1024
	DefaultPreauthStreams = 100
	DefaultHeaderTimeout  = 10 * time.Second
	DefaultAuthTimeout    = 30 * time.Second
	// maxHeaderBytes bounds a request's header block on both listeners
	// (net/http and quic-go default to 1 MiB): an API request's headers
	// are a few hundred bytes, and 100 streams of a connection that has
	// not authenticated may each buffer this much until HeaderTimeout.
	maxHeaderBytes          = 64 << 10
	DefaultQueueTimeout     = 30 * time.Second
	DefaultMaxDeadline      = 5 * time.Minute
	DefaultShutdownGrace    = 10 * time.Second
	altSvcMaxAge            = 86400
	adminHeaderTimeout      = 10 * time.Second
	idleTimeout             = 2 * time.Minute
	portAttempts            = 32
	shutdownListenerTimeout = time.Second
	// abortCutoff is how long streams ended at the close of the shutdown
	// grace have to send their error event before connections are closed.
	abortCutoff = 2 * time.Second
)

// maxStreamsLimit bounds gateway.max_streams: each open stream may cost
// the gateway a handler goroutine and its buffers.
const maxStreamsLimit = 1 << 16

// minMaxBodyBytes is the least gateway.max_body_bytes accepted.
const minMaxBodyBytes = 1024

// maxShutdownGrace is the longest gateway.shutdown_grace accepted.
const maxShutdownGrace = 10 * time.Minute

// WithDefaults returns c with each zero value of its settings replaced by
// its default. What New fills in from the wiring (Tenant, Registry,
// TracerProvider, the auth guard) is left to New.
func (c Config) WithDefaults() Config {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	defDuration := func(v *config.Duration, d time.Duration) {
		if *v == 0 {
			*v = config.Duration(d)
		}
	}
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.Admin == "" {
		c.Admin = DefaultAdmin
	}
	if c.MaxBodyBytes == 0 {
		c.MaxBodyBytes = DefaultMaxBodyBytes
	}
	def(&c.DefaultMaxTokens, DefaultMaxTokens)
	def(&c.MaxStreams, DefaultMaxStreams)
	def(&c.PreauthStreams, min(DefaultPreauthStreams, c.MaxStreams))
	defDuration(&c.HeaderTimeout, DefaultHeaderTimeout)
	defDuration(&c.AuthTimeout, DefaultAuthTimeout)
	def(&c.MaxConnections, DefaultMaxConnections())
	def(&c.MaxConnectionsPerSource, DefaultMaxConnectionsPerSource)
	def(&c.MaxIdleConnections, max(1, c.MaxConnections*3/4))
	defDuration(&c.QueueTimeout, DefaultQueueTimeout)
	defDuration(&c.MaxDeadline, DefaultMaxDeadline)
	defDuration(&c.ShutdownGrace, DefaultShutdownGrace)
	c.Coalesce = c.Coalesce.WithDefaults()
	return c
}

// Validate reports every problem with the settings of the configuration
// file's "gateway" section at once, each naming its key as the file writes
// it: "gateway.max_body_bytes: must be at least 1024, got 10". Zero values
// stand for their defaults. New checks the wiring besides.
func (c Config) Validate() error {
	c = c.WithDefaults()
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("gateway.%s: %s", key, fmt.Sprintf(format, a...)))
	}
	if c.MaxBodyBytes < minMaxBodyBytes {
		bad("max_body_bytes", "must be at least %d, got %d", minMaxBodyBytes, c.MaxBodyBytes)
	}
	if c.DefaultMaxTokens < 1 {
		bad("default_max_tokens", "must be > 0, got %d", c.DefaultMaxTokens)
	}
	if c.MaxStreams < 1 || c.MaxStreams > maxStreamsLimit {
		bad("max_streams", "must be 1..%d, got %d", maxStreamsLimit, c.MaxStreams)
	}
	if c.PreauthStreams < 1 || c.PreauthStreams > c.MaxStreams {
		bad("preauth_streams", "must be 1..max_streams (%d), got %d", c.MaxStreams, c.PreauthStreams)
	}
	if c.HeaderTimeout < 0 {
		bad("header_timeout", "must be positive, got %s", c.HeaderTimeout)
	}
	if c.AuthTimeout < 0 {
		bad("auth_timeout", "must be positive, got %s", c.AuthTimeout)
	}
	if c.MaxConnections < 1 {
		bad("max_connections", "must be > 0, got %d", c.MaxConnections)
	}
	if c.MaxIdleConnections < 1 || c.MaxIdleConnections > c.MaxConnections {
		bad("max_idle_connections", "must be 1..max_connections (%d), got %d", c.MaxConnections, c.MaxIdleConnections)
	}
	if c.MaxConnectionsPerSource < 1 || c.MaxConnectionsPerSource > c.MaxConnections {
		bad("max_connections_per_source", "must be 1..max_connections (%d), got %d", c.MaxConnections, c.MaxConnectionsPerSource)
	}
	if c.MaxDeadline < 0 {
		bad("max_deadline", "must be positive, got %s", c.MaxDeadline)
	}
	if c.QueueTimeout < 0 || c.QueueTimeout > c.MaxDeadline {
		bad("deadline", "must be positive and at most gateway.max_deadline (%s), got %s", c.MaxDeadline, c.QueueTimeout)
	}
	if g := time.Duration(c.ShutdownGrace); g < 0 || g > maxShutdownGrace {
		bad("shutdown_grace", "must be 0..10m, got %s", g)
	}
	errs = append(errs, c.Coalesce.validate()...)
	return errors.Join(errs...)
}

// Gateway serves the API on one port over HTTP/3 and TCP, and the admin
// endpoints on another.
type Gateway struct {
	cfg     Config
	sched   Scheduler
	catalog Catalog
	log     *slog.Logger
	metrics *metrics
	tracer  trace.Tracer
	// limits is swapped whole by SetRateLimits; a request loads it once
	// and keeps what it loaded.
	limits  atomic.Pointer[limiter]
	created int64 // unix seconds, reported as every model's creation time

	mu      sync.Mutex
	started bool
	// stopped is set by Shutdown: the HTTP/3 loop's contexts are spent,
	// so a gateway is started once.
	stopped bool
	// tcpAuthTimers holds each open TCP connection's AuthTimeout timer,
	// by connection, until the connection closes.
	tcpAuthTimers sync.Map
	addr          string
	admin         string
	udp           net.PacketConn
	quicTr        *quic.Transport
	quicLn        *quic.EarlyListener
	h3            *http3.Server
	tcp           *http.Server
	adminSrv      *http.Server
	serving       sync.WaitGroup

	// ticketKeys only holds the session-ticket keys: both listeners
	// encrypt and decrypt tickets through it, so SetSessionTicketKeys
	// reaches the configs that quic-go and net/http cloned at start.
	ticketKeys *tls.Config
	// aborting is cancelled, with cause errShuttingDown, when the
	// shutdown grace ends: the streams still running then end with an
	// error event instead of being cut off.
	aborting context.Context
	abort    context.CancelCauseFunc

	conns *connLimiter
	idle  *idleConns
	// h3Grace ends when Shutdown begins: HTTP/3 connections stop taking
	// new streams. h3Close ends when the grace is over: they close.
	h3Grace, h3Close       context.Context
	h3GraceEnd, h3CloseAll context.CancelFunc
	h3Conns                sync.WaitGroup // serveH3Conn
	h3Accepted             chan struct{}  // closed when serveH3 returns

	// tokenizing holds a slot per token request encoding (tokenizeSlots).
	tokenizing chan struct{}
}

// New validates cfg and builds a gateway; Start opens its sockets.
func New(cfg Config, sched Scheduler, cat Catalog, log *slog.Logger) (*Gateway, error) {
	errs := []error{cfg.Validate()}
	cfg = cfg.WithDefaults()
	if cfg.TLS == nil || (len(cfg.TLS.Certificates) == 0 && cfg.TLS.GetCertificate == nil && cfg.TLS.GetConfigForClient == nil) {
		errs = append(errs, errors.New("gateway.tls: a certificate is required"))
	}
	if _, _, err := net.SplitHostPort(cfg.Listen); err != nil {
		errs = append(errs, fmt.Errorf("gateway.listen: %w", err))
	}
	if _, _, err := net.SplitHostPort(cfg.Admin); err != nil {
		errs = append(errs, fmt.Errorf("gateway.admin: %w", err))
	}
	errs = append(errs, ValidateAdminHosts("gateway.admin_hosts", cfg.AdminHosts)...)
	if sched == nil {
		errs = append(errs, errors.New("gateway: scheduler is nil"))
	}
	if cat == nil {
		errs = append(errs, errors.New("gateway: catalog is nil"))
	}
	if log == nil {
		errs = append(errs, errors.New("gateway: logger is nil"))
	}
	if !cfg.Auth.Disabled && cfg.Auth.Tokens == nil {
		errs = append(errs, errors.New("gateway.auth: a token verifier is required unless auth is disabled"))
	}
	errs = append(errs, ValidateEarlyData("gateway.early_data", cfg.Auth.EarlyData)...)
	for i, p := range cfg.Auth.TrustedProxies {
		if !p.IsValid() || p != p.Masked() || p.Addr().Is4In6() {
			errs = append(errs, fmt.Errorf("gateway.auth.trusted_proxies[%d]: want a valid, masked prefix that is not IPv4-mapped, got %s", i, p))
		}
	}
	if err := validateRateLimits(cfg.RateLimits); err != nil {
		errs = append(errs, err)
	}
	if host, _, err := net.SplitHostPort(cfg.Admin); err == nil && !isLoopback(host) && cfg.AdminToken == "" {
		errs = append(errs, fmt.Errorf("gateway.admin: %q is not a loopback address; set admin_token to expose it", cfg.Admin))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if cfg.Tenant == nil {
		cfg.Tenant = tokenTenant
	}
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
	}
	if cfg.TracerProvider == nil {
		cfg.TracerProvider = noop.NewTracerProvider()
	}
	m, err := newMetrics(cfg.Registry)
	if err != nil {
		return nil, err
	}
	initRefusals(m, cfg.RateLimits)
	conns, err := newConnLimiter(cfg.MaxConnections, cfg.MaxConnectionsPerSource, cfg.Registry)
	if err != nil {
		return nil, err
	}
	idle, err := newIdleConns(cfg.MaxIdleConnections, cfg.Registry)
	if err != nil {
		return nil, err
	}
	g := &Gateway{
		conns:   conns,
		idle:    idle,
		cfg:     cfg,
		sched:   sched,
		catalog: cat,
		log:     log,
		metrics: m,
		tracer:  cfg.TracerProvider.Tracer(tracerName),
		created: time.Now().Unix(),
		// A clone keeps the keys the caller set on cfg.TLS (or its
		// automatic ones).
		ticketKeys: cfg.TLS.Clone(),
		tokenizing: make(chan struct{}, tokenizeSlots()),
	}
	g.limits.Store(newLimiter(cfg.RateLimits, nil, m, log))
	g.aborting, g.abort = context.WithCancelCause(context.Background())
	g.h3Close, g.h3CloseAll = context.WithCancel(context.Background())
	g.h3Grace, g.h3GraceEnd = context.WithCancel(g.h3Close)
	g.h3Accepted = make(chan struct{})
	if err := defaultAuth(&g.cfg.Auth, g); err != nil {
		return nil, err
	}
	return g, nil
}

// Start opens the UDP, TCP and admin sockets and serves them in goroutines
// that Shutdown waits for.
func (g *Gateway) Start() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.started || g.stopped {
		return errors.New("gateway: already started")
	}
	api, err := g.routes()
	if err != nil {
		return err
	}
	udp, tcp, err := listenPair(g.cfg.Listen)
	if err != nil {
		return err
	}
	adminLn, err := net.Listen("tcp", g.cfg.Admin)
	if err != nil {
		udp.Close()
		tcp.Close()
		return fmt.Errorf("gateway: admin listen %s: %w", g.cfg.Admin, err)
	}
	port := tcp.Addr().(*net.TCPAddr).Port
	host, _, _ := net.SplitHostPort(g.cfg.Listen)
	g.addr = net.JoinHostPort(host, strconv.Itoa(port))
	g.admin = adminLn.Addr().String()

	g.quicTr = &quic.Transport{
		Conn:        udp,
		ConnContext: g.quicConnContext,
		// A source at its limit proves its address with a Retry before it
		// is refused, so that a spoofed one cannot lock its owner out.
		VerifySourceAddress: func(a net.Addr) bool { return g.conns.busy(sourceOf(a)) },
	}
	if k := g.cfg.QUICKeys; k != nil {
		tg, sr := quic.TokenGeneratorKey(k.TokenGenerator), quic.StatelessResetKey(k.StatelessReset)
		g.quicTr.TokenGeneratorKey, g.quicTr.StatelessResetKey = &tg, &sr
	}
	quicTLS := g.cfg.TLS.Clone()
	g.installTickets(quicTLS)
	quicLn, err := g.quicTr.ListenEarly(http3.ConfigureTLSConfig(quicTLS), &quic.Config{
		// 0-RTT needs the guard: without auth there are no early proofs
		// and no single-use tickets.
		Allow0RTT:             !g.cfg.Auth.Disabled && !g.cfg.Auth.Disable0RTT,
		MaxIncomingStreams:    int64(g.cfg.MaxStreams),
		MaxIncomingUniStreams: maxIncomingUniStreams,
		Tracer:                g.cfg.QUICTracer,
	})
	if err != nil {
		g.quicTr.Close()
		udp.Close()
		tcp.Close()
		adminLn.Close()
		return fmt.Errorf("gateway: quic listen %s: %w", g.addr, err)
	}
	g.udp, g.quicLn = udp, quicLn

	g.h3 = &http3.Server{
		Handler:        clearHeaderDeadline(g.instrument(api)),
		ConnContext:    g.connContext,
		MaxHeaderBytes: maxHeaderBytes,
		Logger:         g.log,
	}
	tcpTLS := g.cfg.TLS.Clone()
	g.installTickets(tcpTLS)
	tcpTLS.NextProtos = append([]string{"h2", "http/1.1"}, g.cfg.TCPProtos...)
	altSvc := fmt.Sprintf(`h3=":%d"; ma=%d`, port, altSvcMaxAge)
	g.tcp = &http.Server{
		Handler:           g.instrument(advertiseH3(altSvc, api)),
		TLSConfig:         tcpTLS,
		ReadHeaderTimeout: time.Duration(g.cfg.HeaderTimeout),
		MaxHeaderBytes:    maxHeaderBytes,
		IdleTimeout:       idleTimeout,
		ConnContext:       g.tcpConnContext,
		ConnState:         g.tcpConnState,
		HTTP2:             &http.HTTP2Config{MaxConcurrentStreams: g.cfg.MaxStreams},
		ErrorLog:          slog.NewLogLogger(g.log.Handler(), slog.LevelDebug),
	}
	g.adminSrv = &http.Server{
		Handler:           g.adminRoutes(),
		ReadHeaderTimeout: adminHeaderTimeout,
		ErrorLog:          slog.NewLogLogger(g.log.Handler(), slog.LevelDebug),
	}

	g.serving.Add(3)
	go func() {
		defer g.serving.Done()
		g.serveH3(quicLn)
	}()
	go func() {
		defer g.serving.Done()
		// ServeTLS with empty file names uses the certificates in TLSConfig.
		if err := g.tcp.ServeTLS(limitListener{Listener: tcp, l: g.conns}, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			g.log.Error("tcp listener stopped", "addr", g.addr, "err", err)
		}
	}()
	go func() {
		defer g.serving.Done()
		if err := g.adminSrv.Serve(adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			g.log.Error("admin listener stopped", "addr", g.admin, "err", err)
		}
	}()
	g.started = true
	g.log.Info("gateway listening", "addr", g.addr, "admin", g.admin)
	return nil
}

// installTickets makes c encrypt and decrypt session tickets with the keys
// held by g.ticketKeys, through the single-use ticket guard when auth has
// one.
func (g *Gateway) installTickets(c *tls.Config) {
	if t := g.cfg.Auth.Tickets; t != nil {
		t.Install(g.ticketKeys)
		c.WrapSession, c.UnwrapSession = g.ticketKeys.WrapSession, g.ticketKeys.UnwrapSession
		return
	}
	c.WrapSession, c.UnwrapSession = g.ticketKeys.EncryptTicket, g.ticketKeys.DecryptTicket
}

// initRefusals starts the refusal counters at 0 for every tenant label they
// can have, so that rate() sees the first refusal.
func initRefusals(m *metrics, rl RateLimits) {
	for _, tenant := range append([]string{scheduler.DefaultTenant, "other"}, slices.Sorted(maps.Keys(rl.Tenants))...) {
		for _, kind := range []string{limitRequests, limitTokens, limitConcurrency, limitTokensPerMinute} {
			m.refusals.WithLabelValues(tenant, kind)
		}
	}
}

// SetRateLimits replaces the rate limits while serving. Limits that do not
// validate are refused and the current ones stay. The swap is atomic:
// requests admitted before it keep the limits they were admitted under
// (their output-token pacing included) until they end; later ones see the
// new limits. With rl.Store nil the current store is kept, and with it what
// the buckets hold; concurrency counts always carry over.
func (g *Gateway) SetRateLimits(rl RateLimits) error {
	if err := validateRateLimits(rl); err != nil {
		return err
	}
	initRefusals(g.metrics, rl)
	g.limits.Store(newLimiter(rl, g.limits.Load(), g.metrics, g.log))
	return nil
}

// SetSessionTicketKeys replaces the session-ticket keys of both listeners:
// the first encrypts new tickets, all of them decrypt. Connections already
// open are not touched.
func (g *Gateway) SetSessionTicketKeys(keys [][32]byte) {
	g.ticketKeys.SetSessionTicketKeys(keys)
}

// listenPair binds UDP and TCP on the same port. With port 0 the kernel picks
// the UDP port, which may be taken on TCP, so it tries again a few times.
func listenPair(addr string) (net.PacketConn, net.Listener, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, fmt.Errorf("gateway.listen: %w", err)
	}
	attempts := 1
	if port == "0" {
		attempts = portAttempts
	}
	var lastErr error
	for range attempts {
		udp, err := net.ListenPacket("udp", addr)
		if err != nil {
			return nil, nil, fmt.Errorf("gateway: udp listen %s: %w", addr, err)
		}
		p := udp.LocalAddr().(*net.UDPAddr).Port
		tcp, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(p)))
		if err == nil {
			return udp, tcp, nil
		}
		udp.Close()
		lastErr = err
	}
	return nil, nil, fmt.Errorf("gateway: tcp listen on the udp port of %s: %w", addr, lastErr)
}

// Addr is the host:port served on both UDP and TCP.
func (g *Gateway) Addr() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.addr
}

// AdminAddr is the host:port of the admin listener.
func (g *Gateway) AdminAddr() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.admin
}

// Shutdown stops accepting, sends GOAWAY on HTTP/2 connections, rejects
// new HTTP/3 streams (H3_REQUEST_REJECTED; see h3conn.go for why no
// GOAWAY) and lets running handlers finish within ctx, closing each HTTP/3
// connection with H3_NO_ERROR once its handlers are done. When ctx ends, streams still
// running get an error event saying the server is shutting down and end;
// whatever is still open abortCutoff later is cut off.
func (g *Gateway) Shutdown(ctx context.Context) error {
	g.mu.Lock()
	if !g.started {
		g.mu.Unlock()
		return nil
	}
	g.started = false
	g.stopped = true
	tcp, adminSrv := g.tcp, g.adminSrv
	quicLn, quicTr, udp := g.quicLn, g.quicTr, g.udp
	g.mu.Unlock()

	// The servers wait past ctx for the handlers that end their streams
	// with an error event; hard bounds that wait.
	hard, cancelHard := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelHard()
	drained := make(chan struct{})
	var watcher sync.WaitGroup
	watcher.Go(func() {
		select {
		case <-drained:
			return
		case <-ctx.Done():
		}
		g.log.Warn("shutdown grace over; ending the streams still running")
		g.abort(errShuttingDown)
		t := time.NewTimer(abortCutoff)
		defer t.Stop()
		select {
		case <-drained:
		case <-t.C:
			cancelHard()
		}
	})
	var servers sync.WaitGroup
	var h3Err, tcpErr error
	servers.Go(func() { h3Err = g.shutdownH3(hard) })
	servers.Go(func() { tcpErr = tcp.Shutdown(hard) })
	servers.Wait()
	close(drained)
	watcher.Wait()
	if tcpErr != nil {
		// Handlers outlived the cutoff: cut the rest off. (shutdownH3
		// does this itself.)
		tcpErr = errors.Join(tcpErr, tcp.Close())
	}
	// Admin has only short requests; its own bound keeps a stuck scrape from
	// holding shutdown after ctx has already been spent on the API.
	adminCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownListenerTimeout)
	adminErr := adminSrv.Shutdown(adminCtx)
	cancel()
	if adminErr != nil {
		adminErr = errors.Join(adminErr, adminSrv.Close())
	}
	lnErr := quicLn.Close()
	trErr := quicTr.Close()
	udpErr := udp.Close()
	g.serving.Wait()
	if err := errors.Join(h3Err, tcpErr, adminErr, lnErr, trErr, udpErr); err != nil {
		return fmt.Errorf("gateway: shutdown: %w", err)
	}
	return nil
}

// advertiseH3 tells TCP clients that the same port speaks HTTP/3.
func advertiseH3(altSvc string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Alt-Svc", altSvc)
		next.ServeHTTP(w, r)
	})
}

type quicConnKey struct{}

// connContext stashes the connection for handlers (the 0-RTT policy needs to
// know whether the handshake has completed when a request arrives) and
// starts the connection's metrics.
func (g *Gateway) connContext(ctx context.Context, c *quic.Conn) context.Context {
	g.metrics.quic.track(c)
	return context.WithValue(ctx, quicConnKey{}, c)
}

// isLoopback reports whether host names only this machine. An empty host
// listens on every address, which is not loopback.
func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// quicConn returns the HTTP/3 connection a request came on, or nil over TCP.
func quicConn(ctx context.Context) *quic.Conn {
	c, _ := ctx.Value(quicConnKey{}).(*quic.Conn)
	return c
}
