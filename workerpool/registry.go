package workerpool

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"h3infer/infer"
	"h3infer/workerconf"

	"github.com/prometheus/client_golang/prometheus"
)

// RegistryConfig configures a Registry. Zero values mean the documented
// defaults.
type RegistryConfig struct {
	// Root is the model repository, laid out root/NAME/VERSION/ with
	// model.json, tokenizer.json and model.onnx in each version; VERSION
	// is a positive integer. Empty: no repository; models come only from
	// Static.
	Root string
	// Static are models served under their own name with version "1"
	// and no repository behind them (the `models` config key).
	Static []workerconf.Model
	// Poll is how often Watch reads the repository; 0 means 2s.
	Poll time.Duration
	// AutoPromote makes Watch load a new, higher version of a model and
	// switch to it by itself; otherwise new versions wait for the admin
	// API. A model name seen for the first time is always loaded.
	AutoPromote bool
	// DrainTimeout bounds how long a retired version waits for its
	// requests to finish before it is unloaded anyway; 0 means 5m.
	DrainTimeout time.Duration
	// Registerer, when set, receives the per-version metrics.
	Registerer prometheus.Registerer

	// MemoryLimit bounds the host memory the workers' models take
	// together, as memory.go estimates it: a version whose load would
	// take them past it is refused, so that a hot swap, which holds the
	// old version beside the new until the old drains, fails cleanly
	// instead of the kernel killing a worker. 0 means no bound.
	MemoryLimit int64
	// Workers and KVCacheBytes are the worker count and each worker's
	// KV-cache budget, which the estimate counts.
	Workers      int
	KVCacheBytes int64
}

// Defaults of RegistryConfig.
const (
	DefaultRepositoryPoll = 2 * time.Second
	DefaultDrainTimeout   = 5 * time.Minute
)

// ModelLoader loads and unloads models in the workers; *Pool is one.
type ModelLoader interface {
	LoadModel(ctx context.Context, spec workerconf.Model) error
	UnloadModel(ctx context.Context, name string) error
	Models() []infer.ModelInfo
	Ready() bool
}

// Registry knows the versions of every model, which of them the workers
// have loaded, and how requests are split between them: a primary version,
// an optional weighted canary (sticky per key), a previous version kept
// loaded for rollback. It lives in the gateway process and routes each
// request to a worker-side model named NAME@VERSION.
//
// A switch is atomic: a request is routed under the registry's lock and
// holds its version until it ends, and a version leaves the workers only
// when the last request routed to it has ended.
type Registry struct {
	// cfg's Poll, AutoPromote and DrainTimeout change under mu (SetPolicy).
	cfg    RegistryConfig
	loader ModelLoader
	log    *slog.Logger

	requests *prometheus.CounterVec
	inflight *prometheus.GaugeVec
	role     *prometheus.GaugeVec

	opMu sync.Mutex // one change of versions at a time: loads are slow and must not interleave

	mu     sync.Mutex
	models map[string]*family

	pollChanged chan struct{} // SetPolicy changed Poll; Watch resets its ticker
	closing     chan struct{}
	closeOnce   sync.Once
	wg          sync.WaitGroup // retirements
}

// family is the versions of one model name.
type family struct {
	name     string
	versions map[string]*version // loaded in the workers
	primary  string
	previous string // kept loaded for rollback; "" if none
	canary   string
	weight   float64           // share of requests the canary gets, [0, 1]
	failed   map[string]string // version -> why it was refused, for the status
	seen     map[string]string // version -> the signature Watch last saw
	tried    map[string]string // version -> the signature of its failed load; not retried until it changes
	static   bool
}

// version is one loaded version.
type version struct {
	model, ver, target, dir string
	inflight                int
	retired                 bool
	drained                 chan struct{} // closed when retired and inflight reaches 0
	gone                    chan struct{} // closed when its retirement has ended
}

// VersionError is a refused admin request or route; NotFound says whether
// the model or version does not exist, as opposed to a request that
// contradicts the state (unloading the primary, say) or a version that
// failed to load.
type VersionError struct {
	Msg      string
	notFound bool
}

func (e *VersionError) Error() string { return e.Msg }

// NotFound reports whether the error names a model or version that does
// not exist.
func (e *VersionError) NotFound() bool { return e.notFound }

func notFound(format string, args ...any) error {
	return &VersionError{Msg: fmt.Sprintf(format, args...), notFound: true}
}

func conflict(format string, args ...any) error {
	return &VersionError{Msg: fmt.Sprintf(format, args...)}
}

// Target is the worker-side name of a model version.
func Target(model, ver string) string { return model + "@" + ver }

// NewRegistry makes a registry over loader. Call Initial before the
// workers start to learn what they load first.
func NewRegistry(cfg RegistryConfig, loader ModelLoader, log *slog.Logger) (*Registry, error) {
	p, err := Policy{Poll: cfg.Poll, AutoPromote: cfg.AutoPromote, DrainTimeout: cfg.DrainTimeout}.withDefaults()
	if err != nil {
		return nil, err
	}
	cfg.Poll, cfg.DrainTimeout = p.Poll, p.DrainTimeout
	r := &Registry{cfg: cfg, loader: loader, log: log, models: map[string]*family{}, closing: make(chan struct{}), pollChanged: make(chan struct{}, 1),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_model_version_requests_total",
			Help: "Requests routed to each loaded model version, by outcome (ok or error).",
		}, []string{"model", "version", "outcome"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "h3infer_model_version_inflight_requests",
			Help: "Requests routed to each loaded model version and not yet ended.",
		}, []string{"model", "version"}),
		role: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "h3infer_model_version_weight",
			Help: "Share of new requests each loaded model version receives (0 for a standby kept for rollback).",
		}, []string{"model", "version"}),
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{r.requests, r.inflight, r.role} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("registry: register metrics: %w", err)
			}
		}
	}
	return r, nil
}

// Initial returns the models the workers load at start: every static
// model, and the highest complete version of each model in the
// repository, which become the primaries. Versions that are not complete
// yet are left for Watch.
func (r *Registry) Initial() ([]workerconf.Model, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var specs []workerconf.Model
	// add registers a version; placement carries a static model's provider
	// settings (repository versions run on the default provider).
	add := func(name, ver, dir string, static bool, placement workerconf.Model) error {
		if !static {
			if _, err := workerconf.ReadModelConfig(dir); err != nil {
				return fmt.Errorf("model %s version %s: %w", name, ver, err)
			}
		}
		v := &version{model: name, ver: ver, target: Target(name, ver), dir: dir, drained: make(chan struct{}), gone: make(chan struct{})}
		if static {
			v.target = name
		}
		f := &family{name: name, versions: map[string]*version{ver: v}, primary: ver, failed: map[string]string{}, seen: map[string]string{}, tried: map[string]string{}, static: static}
		r.models[name] = f
		r.setWeights(f)
		specs = append(specs, workerconf.Model{Name: v.target, Dir: dir, Provider: placement.Provider, DeviceID: placement.DeviceID, DeviceKV: placement.DeviceKV})
		return nil
	}
	var errs []error
	for _, s := range r.cfg.Static {
		errs = append(errs, add(s.Name, "1", s.Dir, true, s))
	}
	if r.cfg.Root != "" {
		repo, err := scanRepository(r.cfg.Root)
		if err != nil {
			return nil, err
		}
		for _, name := range sortedKeys(repo) {
			if r.models[name] != nil {
				errs = append(errs, fmt.Errorf("model %s: both in the repository and in models", name))
				continue
			}
			vers := repo[name]
			if len(vers) == 0 {
				continue
			}
			top := vers[len(vers)-1]
			errs = append(errs, add(name, top.ver, top.dir, false, workerconf.Model{}))
			r.models[name].seen[top.ver] = top.sig
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if need := r.memoryNeed(""); r.cfg.MemoryLimit > 0 && need > r.cfg.MemoryLimit { // "" : nothing beside them
		return nil, fmt.Errorf("the models need about %d MiB of memory, more than model_repository.memory_limit_bytes %d MiB", need>>20, r.cfg.MemoryLimit>>20)
	}
	return specs, nil
}

// repoVersion is one complete version directory.
type repoVersion struct {
	ver, dir string
	num      uint64
	sig      string // names, sizes and times of its files: equal on two reads means it is not being written
}

// scanRepository lists the complete versions under root, by name, in
// ascending version order.
func scanRepository(root string) (map[string][]repoVersion, error) {
	names, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("model repository: %w", err)
	}
	out := map[string][]repoVersion{}
	for _, n := range names {
		if !n.IsDir() || n.Name()[0] == '.' {
			continue
		}
		vers, err := os.ReadDir(filepath.Join(root, n.Name()))
		if err != nil {
			return nil, fmt.Errorf("model repository: %w", err)
		}
		var list []repoVersion
		for _, v := range vers {
			num, err := strconv.ParseUint(v.Name(), 10, 32)
			if err != nil || num == 0 || strconv.FormatUint(num, 10) != v.Name() {
				continue // not a version: temporary directories being written, notes
			}
			dir := filepath.Join(root, n.Name(), v.Name())
			sig, ok := versionSignature(dir)
			if !ok {
				continue
			}
			list = append(list, repoVersion{ver: v.Name(), dir: dir, num: num, sig: sig})
		}
		slices.SortFunc(list, func(a, b repoVersion) int { return int(a.num) - int(b.num) })
		out[n.Name()] = list
	}
	return out, nil
}

// versionSignature describes dir's files, and reports false while one of
// the three required files is missing.
func versionSignature(dir string) (string, bool) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", false
	}
	have := 0
	var sig []byte
	for _, e := range entries {
		switch e.Name() {
		case workerconf.ModelConfigFile, workerconf.TokenizerFile, workerconf.ModelFile:
			have++
		}
		info, err := e.Info()
		if err != nil {
			return "", false
		}
		sig = fmt.Appendf(sig, "%s:%d:%d;", e.Name(), info.Size(), info.ModTime().UnixNano())
	}
	return string(sig), have == 3
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// Route picks the version that serves one request for model: the pinned
// version when pin is set, else the canary for its share of keys, else
// the primary. A non-empty key (tenant or user) always lands on the same
// side of a canary split; an empty one is split at random. done must be
// called once the request has ended; it reports whether it failed.
func (r *Registry) Route(model, key, pin string) (target, ver string, done func(failed bool), err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	v, err := r.pick(model, key, pin)
	if err != nil {
		return "", "", nil, err
	}
	v.inflight++
	r.inflight.WithLabelValues(v.model, v.ver).Inc()
	var once sync.Once
	return v.target, v.ver, func(failed bool) {
		once.Do(func() { r.release(v, failed) })
	}, nil
}

// Resolve names the version of model that Route would pick for key and
// pin now, and the directory it was loaded from, without routing a
// request to it: what /tokenize needs to count tokens as that version's
// workers would. A static model's directory is the one its config names
// (workerconf.SyntheticDir for the synthetic model).
func (r *Registry) Resolve(model, key, pin string) (ver, dir string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	v, err := r.pick(model, key, pin)
	if err != nil {
		return "", "", err
	}
	return v.ver, v.dir, nil
}

// pick chooses the version of model for key and pin; r.mu held.
func (r *Registry) pick(model, key, pin string) (*version, error) {
	f := r.models[model]
	if f == nil || f.primary == "" {
		return nil, notFound("model %q does not exist", model)
	}
	switch {
	case pin != "":
		v := f.versions[pin]
		if v == nil || v.retired {
			return nil, notFound("model %q has no loaded version %q", model, pin)
		}
		return v, nil
	case f.canary != "" && bucket(model, key) < f.weight:
		return f.versions[f.canary], nil
	}
	return f.versions[f.primary], nil
}

// bucket maps a key to [0, 1): a hash, so a key's side of a split holds
// across requests, restarts and gateway instances.
func bucket(model, key string) float64 {
	if key == "" {
		return rand.Float64()
	}
	h := fnv.New64a()
	h.Write([]byte(model))
	h.Write([]byte{0})
	h.Write([]byte(key))
	// fnv's output is poorly mixed for short keys; a finaliser spreads it.
	x := h.Sum64()
	x ^= x >> 29
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 32
	return float64(x>>11) / (1 << 53)
}

func (r *Registry) release(v *version, failed bool) {
	outcome := "ok"
	if failed {
		outcome = "error"
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	v.inflight--
	r.requests.WithLabelValues(v.model, v.ver, outcome).Inc()
	r.inflight.WithLabelValues(v.model, v.ver).Dec()
	if v.retired && v.inflight == 0 {
		close(v.drained)
	}
}

// Models lists every model whose primary the ready workers serve, with
// the primary's facts, for /v1/models.
func (r *Registry) Models() []infer.ModelInfo {
	served := map[string]infer.ModelInfo{}
	for _, m := range r.loader.Models() {
		served[m.Name] = m
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []infer.ModelInfo
	for _, name := range sortedKeys(r.models) {
		f := r.models[name]
		if f.primary == "" {
			continue
		}
		if info, ok := served[f.versions[f.primary].target]; ok {
			info.Name = name
			out = append(out, info)
		}
	}
	return out
}

// Ready reports whether the workers are up.
func (r *Registry) Ready() bool { return r.loader.Ready() }

// Serves reports whether target, a NAME@VERSION that Route returned (or
// the bare NAME of a static model), is a version the workers have loaded. A retired version still counts: its
// requests already routed run to their end.
func (r *Registry) Serves(target string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if f := r.models[target]; f != nil && f.static {
		return true // a static model's one version is served by its name
	}
	i := strings.LastIndexByte(target, '@')
	if i < 0 {
		return false
	}
	f := r.models[target[:i]]
	return f != nil && !f.static && f.versions[target[i+1:]] != nil
}

// Has reports whether model is a model of the registry's, whatever the
// state of its versions.
func (r *Registry) Has(model string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.models[model] != nil
}

// setWeights publishes the share of each loaded version; r.mu held.
func (r *Registry) setWeights(f *family) {
	for ver := range f.versions {
		w := 0.0
		switch ver {
		case f.canary:
			w = f.weight
		case f.primary:
			w = 1
			if f.canary != "" {
				w = 1 - f.weight
			}
		}
		r.role.WithLabelValues(f.name, ver).Set(w)
	}
}

// ModelStatus is what the admin API reports for one model.
type ModelStatus struct {
	Model    string            `json:"model"`
	Primary  string            `json:"primary"`
	Canary   string            `json:"canary,omitempty"`
	Weight   float64           `json:"canary_percent,omitempty"`
	Previous string            `json:"previous,omitempty"`
	Loaded   []VersionStatus   `json:"loaded"`
	Failed   map[string]string `json:"failed,omitempty"`
}

// VersionStatus is one loaded version.
type VersionStatus struct {
	Version  string `json:"version"`
	Dir      string `json:"dir"`
	Inflight int    `json:"inflight"`
	Retiring bool   `json:"retiring,omitempty"`
}

// ModelStatus reports every model's versions and routing.
func (r *Registry) ModelStatus() any {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := []ModelStatus{}
	for _, name := range sortedKeys(r.models) {
		f := r.models[name]
		s := ModelStatus{Model: name, Primary: f.primary, Canary: f.canary, Weight: f.weight * 100, Previous: f.previous, Loaded: []VersionStatus{}}
		for _, ver := range sortedKeys(f.versions) {
			v := f.versions[ver]
			s.Loaded = append(s.Loaded, VersionStatus{Version: ver, Dir: v.dir, Inflight: v.inflight, Retiring: v.retired})
		}
		if len(f.failed) > 0 {
			s.Failed = map[string]string{}
			for k, v := range f.failed {
				s.Failed[k] = v
			}
		}
		out = append(out, s)
	}
	return out
}
