package upstream

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"h3infer/infer"
	"h3infer/scheduler"
)

// DefaultCallBuffer is the number of events a call buffers when
// Options.CallBuffer is 0, as the worker ring's calls do.
const DefaultCallBuffer = 256

// Options carries what a Set gets from the process around it.
type Options struct {
	// Log receives one line per failed request and per change of an
	// upstream's state; nil discards them.
	Log *slog.Logger
	// Registerer takes the upstreams' metrics; nil registers none.
	Registerer prometheus.Registerer
	// TracerProvider makes the "upstream" client spans; nil makes none.
	TracerProvider trace.TracerProvider
	// CallBuffer bounds the unread events of one call; a call whose
	// consumer falls further behind ends with infer.CodeOverflow and its
	// upstream request is cancelled (workers.call_buffer). 0 means
	// DefaultCallBuffer.
	CallBuffer int
	// FirstID is the ID of the first upstream handle; later ones count
	// up from it, so that they never clash with the workers' IDs.
	FirstID int
	// LookupEnv reads the environment variables credential_env names;
	// cmd/h3infer passes os.LookupEnv, which is also what nil means.
	LookupEnv func(string) (string, bool)
}

// Set is the configured upstream servers: the backends the scheduler may
// dispatch their models to, and the models the gateway lists for them.
type Set struct {
	log        *slog.Logger
	metrics    *metrics
	tracer     trace.Tracer
	callBuffer int
	lookupEnv  func(string) (string, bool)

	// current is what Backends and Models read, lock-free, since the
	// scheduler asks under its own lock on every dispatch.
	current atomic.Pointer[[]*Handle]
	// everReady latches Ready: once every upstream has been asked, an
	// upstream that is down later does not make the set unready.
	everReady atomic.Bool

	// wg counts every goroutine of every handle, retired ones
	// included: each probe and each call.
	wg sync.WaitGroup

	mu      sync.Mutex // serialises Update and Close
	nextID  int
	retired []*Handle // replaced or removed, closed once idle
	closed  bool
}

// NewSet checks list, reads each upstream's files and starts one probe
// goroutine per upstream, which discovers its models (when the config
// lists none) and brings it back after an ejection.
func NewSet(list []Config, opt Options) (*Set, error) {
	if err := ValidateAll(list); err != nil {
		return nil, err
	}
	if opt.CallBuffer < 0 {
		return nil, fmt.Errorf("upstream: call buffer must be >= 0, got %d", opt.CallBuffer)
	}
	m, err := newMetrics(opt.Registerer)
	if err != nil {
		return nil, fmt.Errorf("upstream: register metrics: %w", err)
	}
	s := &Set{
		log:        opt.Log,
		metrics:    m,
		callBuffer: opt.CallBuffer,
		lookupEnv:  opt.LookupEnv,
		nextID:     opt.FirstID,
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.callBuffer == 0 {
		s.callBuffer = DefaultCallBuffer
	}
	if s.lookupEnv == nil {
		s.lookupEnv = os.LookupEnv
	}
	tp := opt.TracerProvider
	if tp == nil {
		tp = noop.NewTracerProvider()
	}
	s.tracer = tp.Tracer("h3infer/upstream")

	mats, err := s.loadAll(list)
	if err != nil {
		return nil, err
	}
	hs := make([]*Handle, len(list))
	for i, c := range list {
		if hs[i], err = s.newHandle(c, mats[i]); err != nil {
			for _, h := range hs[:i] {
				h.shut()
				h.closeConns()
			}
			return nil, err
		}
	}
	s.current.Store(&hs)
	for _, h := range hs {
		h.start()
	}
	return s, nil
}

func (s *Set) loadAll(list []Config) ([]material, error) {
	mats := make([]material, len(list))
	var errs []error
	for i, c := range list {
		var err error
		mats[i], err = load(c, fmt.Sprintf("upstreams[%d]", i), s.lookupEnv)
		errs = append(errs, err)
	}
	return mats, errors.Join(errs...)
}

func (s *Set) newHandle(c Config, m material) (*Handle, error) {
	h, err := newHandle(s, s.nextID, c, m)
	if err != nil {
		return nil, err
	}
	s.nextID++
	return h, nil
}

func (s *Set) handles() []*Handle {
	if p := s.current.Load(); p != nil {
		return *p
	}
	return nil
}

// Backends lists the upstreams, ready or not, that serve model. model
// may be NAME@VERSION, a version of a local model repository the gateway
// routed to: an upstream serving NAME takes it, and is sent NAME. It takes
// no lock: the scheduler calls it under its own.
func (s *Set) Backends(model string) []scheduler.Backend {
	name := modelName(model)
	var out []scheduler.Backend
	for _, h := range s.handles() {
		if h.serves(name) {
			out = append(out, h)
		}
	}
	return out
}

// modelName is model without the @VERSION the gateway's router may add.
func modelName(model string) string {
	name, _, _ := strings.Cut(model, "@")
	return name
}

// Models is the union of the models the upstreams serve, each listed
// once, by name.
func (s *Set) Models() []infer.ModelInfo {
	byName := map[string]infer.ModelInfo{}
	for _, h := range s.handles() {
		for _, m := range h.models() {
			if old, ok := byName[m.Name]; !ok || old.ContextLength == 0 {
				byName[m.Name] = m
			}
		}
	}
	out := make([]infer.ModelInfo, 0, len(byName))
	for _, m := range byName {
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Ready reports whether every upstream has been asked for its models
// once, answering or not, so that the gateway does not list an empty
// catalog merely because nobody asked yet. Once true it stays true: an
// upstream that is down is the scheduler's business, not readiness's.
func (s *Set) Ready() bool {
	if s.everReady.Load() {
		return true
	}
	for _, h := range s.handles() {
		if !h.probed.Load() {
			return false
		}
	}
	s.everReady.Store(true)
	return true
}

// BackendStates is a []Status, one for each configured upstream, in the
// order of the config.
func (s *Set) BackendStates() any {
	hs := s.handles()
	out := make([]Status, len(hs))
	for i, h := range hs {
		out[i] = h.status()
	}
	return out
}

// Update applies a new "upstreams" list (SIGHUP). It checks the list and
// reads every file first and changes nothing when any of that fails. An
// upstream whose config and files are unchanged keeps its handle; a
// changed or new one gets a new handle (the scheduler keys its slots on
// the handle, so requests in flight on the old one finish there); a
// removed or replaced one takes no new requests and is closed once its
// requests have ended.
func (s *Set) Update(list []Config) error {
	if err := ValidateAll(list); err != nil {
		return err
	}
	mats, err := s.loadAll(list)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("upstream: update: the set is closed")
	}
	old := map[string]*Handle{}
	for _, h := range s.handles() {
		old[h.cfg.Name] = h
	}
	next := make([]*Handle, len(list))
	var fresh []*Handle
	for i, c := range list {
		if h := old[c.Name]; h != nil && sameConfig(h.cfg, c.WithDefaults()) && h.mat.digest == mats[i].digest {
			next[i] = h
			delete(old, c.Name)
			continue
		}
		h, err := s.newHandle(c, mats[i])
		if err != nil {
			for _, f := range fresh {
				f.shut()
				f.closeConns()
			}
			return err
		}
		next[i], fresh = h, append(fresh, h)
	}
	s.current.Store(&next)
	for _, h := range fresh {
		h.start()
	}
	for _, h := range old {
		s.log.Info("upstream retired", "upstream", h.cfg.Name, "backend", h.id,
			"replaced", slices.ContainsFunc(next, func(n *Handle) bool { return n.cfg.Name == h.cfg.Name }))
		if !slices.ContainsFunc(next, func(n *Handle) bool { return n.cfg.Name == h.cfg.Name }) {
			s.metrics.up.DeleteLabelValues(h.cfg.Name)
		}
		h.retire()
		s.retired = append(s.retired, h)
	}
	// A retired handle closes its connections itself once idle; the Set
	// forgets it then (its last goroutines are still in wg).
	s.retired = slices.DeleteFunc(s.retired, (*Handle).closedNow)
	return nil
}

// Close stops the probes, cancels the calls in flight (each ends with an
// error event) and closes every connection. It waits for the goroutines
// it started.
func (s *Set) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.closed = true
	hs := append(slices.Clone(s.handles()), s.retired...)
	for _, h := range hs {
		h.shut()
	}
	s.wg.Wait()
	for _, h := range hs {
		h.closeConns()
	}
	s.retired = nil
}

// Status is one upstream's state, as /debug/state shows it.
type Status struct {
	Name                string            `json:"name"`
	URL                 string            `json:"url"`
	Protocol            string            `json:"protocol"`
	State               string            `json:"state"` // up, ejected
	InFlight            int               `json:"in_flight"`
	Slots               int               `json:"slots"`
	Models              []string          `json:"models"`
	ConsecutiveFailures int               `json:"consecutive_failures"`
	Requests            uint64            `json:"requests"`
	Errors              map[string]uint64 `json:"errors,omitempty"` // by kind, as errors_total counts them
	LastError           string            `json:"last_error,omitempty"`
	// TTFTSeconds is an exponentially weighted mean of the time to the
	// first token, 0 before any.
	TTFTSeconds float64 `json:"ttft_ewma_seconds"`
}

// States.
const (
	StateUp      = "up"
	StateEjected = "ejected"
)
