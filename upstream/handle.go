package upstream

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"h3infer/infer"
	"h3infer/scheduler"
)

// Limits on what an upstream may send.
const (
	maxHeaderBytes    = 64 << 10
	maxErrorBody      = 64 << 10
	maxModelsBody     = 4 << 20
	maxLine           = 1 << 20
	maxMessage        = 300
	maxRetryAfter     = time.Hour
	idleConnTimeout   = 90 * time.Second
	keepAlive         = 15 * time.Second
	ttftEWMAWeight    = 0.2
	maxLastErrorBytes = 300
)

// Causes a call's context ends with; the call's goroutine tells from
// them what happened.
var (
	errCancelled = errors.New("cancelled by the gateway")
	errStall     = errors.New("stalled")
	errTimeout   = errors.New("request timed out")
	errClosed    = errors.New("upstream closed")
	errOverflow  = errors.New("consumer fell behind")
	errRetired   = errors.New("upstream retired")
)

// Handle is one upstream server as the scheduler sees it: a Backend with
// the upstream's slots. A changed config makes a new Handle, so the
// scheduler's accounting, keyed on the handle, starts afresh while the
// old handle's requests finish.
type Handle struct {
	set    *Set
	id     int
	cfg    Config // with defaults
	mat    material
	base   string // the URL without a trailing slash
	host   string
	client *http.Client
	// closeConns closes the transport's connections: the idle ones over
	// TCP, all of them over QUIC (called only once no request runs).
	closeConns func()
	m          handleMetrics

	ctx    context.Context // parent of every call; ends at close
	cancel context.CancelCauseFunc
	probe  context.CancelFunc // stops the probe goroutine

	ready  atomic.Bool // neither ejected nor retired
	probed atomic.Bool // the first probe has answered or failed
	served atomic.Pointer[modelTable]

	mu       sync.Mutex
	ejected  bool
	retired  bool
	closed   bool
	inFlight int
	failures int // consecutive
	requests uint64
	errs     map[string]uint64
	lastErr  string
	ttftEWMA float64 // seconds
}

// modelTable is what an upstream serves, as configured or discovered.
type modelTable struct {
	list   []infer.ModelInfo
	byName map[string]bool
}

func newModelTable(list []infer.ModelInfo) *modelTable {
	t := &modelTable{list: list, byName: make(map[string]bool, len(list))}
	for _, m := range list {
		t.byName[m.Name] = true
	}
	return t
}

// handleMetrics are the set's metrics with this upstream's label.
type handleMetrics struct {
	inFlight  prometheus.Gauge
	up        prometheus.Gauge
	ttft      prometheus.Observer
	cancelled prometheus.Counter
	ejections prometheus.Counter
	requests  *prometheus.CounterVec
	errors    *prometheus.CounterVec
}

func newHandle(s *Set, id int, c Config, mat material) (*Handle, error) {
	c = c.WithDefaults()
	u, err := parseBase(c.URL, c.Protocol)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", c.Name, err)
	}
	name := c.Name
	h := &Handle{
		set:  s,
		id:   id,
		cfg:  c,
		mat:  mat,
		base: u.String(),
		host: u.Host,
		errs: map[string]uint64{},
		m: handleMetrics{
			inFlight:  s.metrics.inFlight.WithLabelValues(name),
			up:        s.metrics.up.WithLabelValues(name),
			ttft:      s.metrics.ttft.WithLabelValues(name),
			cancelled: s.metrics.cancelled.WithLabelValues(name),
			ejections: s.metrics.ejections.WithLabelValues(name),
			requests:  s.metrics.requests.MustCurryWith(prometheus.Labels{"upstream": name}),
			errors:    s.metrics.errors.MustCurryWith(prometheus.Labels{"upstream": name}),
		},
	}
	h.client, h.closeConns = newClient(c, mat)
	h.ctx, h.cancel = context.WithCancelCause(context.Background())
	configured := make([]infer.ModelInfo, len(c.Models))
	for i, m := range c.Models {
		configured[i] = infer.ModelInfo{Name: m}
	}
	h.served.Store(newModelTable(configured))
	h.mu.Lock()
	h.setReadyLocked()
	h.mu.Unlock()
	return h, nil
}

// newClient makes the one client an upstream's requests share: HTTP/2
// multiplexes them over one TLS connection (HTTP/1.1 pools connections
// when the server offers no h2, or over http to a loopback host), HTTP/3
// over one QUIC connection.
func newClient(c Config, m material) (*http.Client, func()) {
	tlsConf := &tls.Config{RootCAs: m.roots, Certificates: m.certs, MinVersion: tls.VersionTLS12}
	noRedirects := func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	stall := time.Duration(c.StallTimeout)
	if c.Protocol == ProtocolH3 {
		tlsConf.MinVersion = tls.VersionTLS13
		tr := &http3.Transport{
			TLSClientConfig: tlsConf,
			QUICConfig: &quic.Config{
				HandshakeIdleTimeout: stall,
				MaxIdleTimeout:       idleConnTimeout,
				KeepAlivePeriod:      keepAlive,
			},
			MaxResponseHeaderBytes: maxHeaderBytes,
			DisableCompression:     true,
		}
		return &http.Client{Transport: tr, CheckRedirect: noRedirects}, func() { tr.Close() }
	}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetHTTP2(true)
	tr := &http.Transport{
		DialContext:            (&net.Dialer{Timeout: stall, KeepAlive: keepAlive}).DialContext,
		TLSClientConfig:        tlsConf,
		TLSHandshakeTimeout:    stall,
		Protocols:              &protocols,
		MaxIdleConnsPerHost:    c.Slots, // HTTP/1.1 needs one connection per request in flight
		IdleConnTimeout:        idleConnTimeout,
		MaxResponseHeaderBytes: maxHeaderBytes,
		DisableCompression:     true,
		// A connection that went silent is found by a ping, not by the
		// next request's stall.
		HTTP2: &http.HTTP2Config{SendPingTimeout: keepAlive, PingTimeout: stall},
	}
	return &http.Client{Transport: tr, CheckRedirect: noRedirects}, tr.CloseIdleConnections
}

// ID is the backend ID the scheduler logs.
func (h *Handle) ID() int { return h.id }

// Ready reports whether the upstream takes requests: false while it is
// ejected and after it was retired. It takes no lock.
func (h *Handle) Ready() bool { return h.ready.Load() }

// Slots is the config's slots.
func (h *Handle) Slots() int { return h.cfg.Slots }

func (h *Handle) serves(model string) bool { return h.served.Load().byName[model] }

func (h *Handle) models() []infer.ModelInfo { return h.served.Load().list }

// start starts the probe goroutine.
func (h *Handle) start() {
	ctx, stop := context.WithCancel(h.ctx)
	h.probe = stop
	h.set.wg.Go(func() { h.probeLoop(ctx) })
}

// probeLoop asks the upstream for its models at once and then every
// discover_interval, until ctx ends.
func (h *Handle) probeLoop(ctx context.Context) {
	t := time.NewTicker(time.Duration(h.cfg.DiscoverInterval))
	defer t.Stop()
	for {
		h.probeOnce(ctx)
		h.probed.Store(true)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// modelList is the answer of GET /v1/models; max_model_len is vLLM's
// (and h3infer's) word for the context length.
type modelList struct {
	Data []struct {
		ID          string `json:"id"`
		MaxModelLen uint32 `json:"max_model_len"`
		// Task "embed" is an encoder, as h3infer marks its own.
		Task string `json:"task"`
	} `json:"data"`
}

// probeOnce fetches the upstream's models. Success brings an ejected
// upstream back and refreshes the models; failure counts towards
// ejection like a failed request; it is logged when it starts a run of
// failures, and the ejection when it comes.
func (h *Handle) probeOnce(parent context.Context) {
	ctx, cancel := context.WithTimeout(parent, time.Duration(h.cfg.StallTimeout))
	defer cancel()
	list, err := h.fetchModels(ctx)
	if err != nil {
		if parent.Err() != nil {
			return // retired or closing
		}
		if n := h.fail(kindProbe, "probe: "+err.Error(), true); n == 1 {
			h.set.log.Warn("upstream probe failed", "upstream", h.cfg.Name, "err", err)
		}
		return
	}
	found := make([]infer.ModelInfo, 0, len(list.Data))
	byName := map[string]infer.ModelInfo{}
	for _, d := range list.Data {
		if _, dup := byName[d.ID]; d.ID == "" || dup {
			continue
		}
		m := infer.ModelInfo{Name: d.ID, ContextLength: d.MaxModelLen}
		if d.Task == "embed" {
			// Whether its vectors may be shortened is the upstream's to
			// say: dimensions go on, and a refusal comes back as a 400.
			m.Encoder, m.Matryoshka = true, true
		}
		byName[d.ID] = m
		found = append(found, m)
	}
	if len(h.cfg.Models) > 0 {
		// The config says which models; the upstream may say how long
		// their contexts are, and which are encoders.
		found = found[:0]
		for _, name := range h.cfg.Models {
			m := byName[name]
			m.Name = name
			found = append(found, m)
		}
	}
	if !slices.Equal(found, h.models()) {
		h.served.Store(newModelTable(found))
	}
	h.mu.Lock()
	back := h.ejected
	if back {
		h.ejected, h.failures = false, 0
		h.setReadyLocked()
	}
	h.mu.Unlock()
	if back {
		h.set.log.Info("upstream back after a successful probe", "upstream", h.cfg.Name)
	}
}

func (h *Handle) fetchModels(ctx context.Context) (*modelList, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.base+"/v1/models", nil)
	if err != nil {
		return nil, err
	}
	h.authorize(req)
	resp, err := h.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
		return nil, fmt.Errorf("GET /v1/models: status %d: %s", resp.StatusCode, errorMessage(body))
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxModelsBody+1))
	if err != nil {
		return nil, fmt.Errorf("GET /v1/models: %w", err)
	}
	if len(body) > maxModelsBody {
		return nil, fmt.Errorf("GET /v1/models: answer larger than %d bytes", maxModelsBody)
	}
	var list modelList
	if err := json.Unmarshal(body, &list); err != nil {
		return nil, fmt.Errorf("GET /v1/models: %w", err)
	}
	return &list, nil
}

// authorize adds the configured credential, and only that.
func (h *Handle) authorize(req *http.Request) {
	if h.mat.credential != "" {
		req.Header.Set("Authorization", "Bearer "+h.mat.credential)
	}
}

// setReadyLocked publishes whether the upstream takes requests.
func (h *Handle) setReadyLocked() {
	ok := !h.ejected && !h.retired
	h.ready.Store(ok)
	if !h.retired {
		if ok {
			h.m.up.Set(1)
		} else {
			h.m.up.Set(0)
		}
	}
}

// fail counts a failure of kind; one that counts towards ejection ejects
// the upstream once eject_after of them follow each other.
func (h *Handle) fail(kind, msg string, counts bool) (consecutive int) {
	h.m.errors.WithLabelValues(kind).Inc()
	h.mu.Lock()
	h.errs[kind]++
	h.lastErr = bound(msg, maxLastErrorBytes)
	eject := false
	if counts {
		h.failures++
		if h.failures >= h.cfg.EjectAfter && !h.ejected {
			h.ejected, eject = true, true
			h.setReadyLocked()
		}
	}
	n := h.failures
	h.mu.Unlock()
	if eject {
		h.m.ejections.Inc()
		h.set.log.Warn("upstream ejected after consecutive failures", "upstream", h.cfg.Name,
			"failures", n, "last_error", msg)
	}
	return n
}

// succeed ends a run of failures.
func (h *Handle) succeed(ttft time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.failures = 0
	if ttft > 0 {
		if h.ttftEWMA == 0 {
			h.ttftEWMA = ttft.Seconds()
		} else {
			h.ttftEWMA += ttftEWMAWeight * (ttft.Seconds() - h.ttftEWMA)
		}
	}
}

func (h *Handle) status() Status {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := Status{
		Name:                h.cfg.Name,
		URL:                 h.base,
		Protocol:            h.cfg.Protocol,
		State:               StateUp,
		InFlight:            h.inFlight,
		Slots:               h.cfg.Slots,
		Models:              []string{},
		ConsecutiveFailures: h.failures,
		Requests:            h.requests,
		LastError:           h.lastErr,
		TTFTSeconds:         h.ttftEWMA,
	}
	if h.ejected {
		st.State = StateEjected
	}
	for _, m := range h.models() {
		st.Models = append(st.Models, m.Name)
	}
	if len(h.errs) > 0 {
		st.Errors = make(map[string]uint64, len(h.errs))
		for k, v := range h.errs {
			st.Errors[k] = v
		}
	}
	return st
}

// retire takes the handle out of dispatch and stops its probe; it is
// closed once its last request has ended.
func (h *Handle) retire() {
	h.mu.Lock()
	h.retired = true
	h.setReadyLocked()
	h.mu.Unlock()
	if h.probe != nil {
		h.probe()
	}
	h.closeIfIdle()
}

// closeIfIdle closes a retired handle's connections once no request runs
// on it.
func (h *Handle) closeIfIdle() {
	h.mu.Lock()
	idle := h.retired && h.inFlight == 0 && !h.closed
	if idle {
		h.closed = true
	}
	h.mu.Unlock()
	if idle {
		h.cancel(errRetired)
		h.closeConns()
	}
}

// closedNow reports whether the handle has been closed.
func (h *Handle) closedNow() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.closed
}

// shut takes no more requests and cancels everything the handle runs;
// the Set waits for its goroutines and then closes its connections.
func (h *Handle) shut() {
	h.mu.Lock()
	h.closed = true
	h.mu.Unlock()
	h.cancel(errClosed)
}

var _ scheduler.Backend = (*Handle)(nil)
