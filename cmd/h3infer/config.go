package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"h3infer/certs"
	"h3infer/config"
	"h3infer/gateway"
	"h3infer/priority"
	"h3infer/scheduler"
	"h3infer/tlsbind"
	"h3infer/upstream"
	"h3infer/workerconf"
	"h3infer/workerpool"
)

// Config is the one typed configuration file of `h3infer serve` (JSON). It
// is decoded strictly: an unknown key is an error. A zero value means the
// documented default; an out-of-range value is an error, never clamped.
// docs/CONFIG.md documents every key.
//
// A section, or the part of one, that a library owns decodes into that
// library's own type (scheduler.Config, gateway.Config, certs.SourceConfig
// and others), which carries its keys, its defaults (WithDefaults) and its
// checks (Validate). What is left here is the command's: the top-level
// keys, the stores and processes it opens, the defaults that follow from
// another section (state_dir, workers.slots) and the checks across
// sections.
type Config struct {
	// Listen is the host:port for HTTP/3 (UDP) and HTTP/1.1+2 (TCP) on one
	// port number. Default 127.0.0.1:8443.
	Listen string `json:"listen"`
	// Admin is the plain-HTTP host:port for /healthz, /readyz, /metrics,
	// /debug/state, /debug/pprof/ and /admin/models. Default
	// 127.0.0.1:9090. It answers only to its own address, localhost or a
	// loopback IP with its port (any IP literal with its port when it
	// listens on every address) and AdminHosts.
	Admin string `json:"admin"`
	// AdminHosts are further host names the admin listener answers to (on
	// any port), for scrapers that reach it by name. Default: none.
	AdminHosts []string `json:"admin_hosts"`
	// QlogDir is serve's --qlog flag: a directory for a qlog trace of
	// every QUIC connection. Not a key of the file: a trace is for one
	// run being looked into, not a standing setting.
	QlogDir string `json:"-"`
	// AdminToken, when set, is required as a bearer token on every admin
	// route but /healthz and /readyz. Default: none on a loopback admin
	// address; on any other, serve generates one into
	// <state_dir>/tokens/admin.token (mode 0600) and keeps it.
	AdminToken string `json:"admin_token"`
	// StateDir holds development certificates, the demo model and the
	// prepacked weights cache.
	// Default .h3infer under the working directory.
	StateDir string `json:"state_dir"`
	// ONNXRuntimeLib is the path of libonnxruntime.so; the environment
	// variable ONNXRUNTIME_LIB overrides it. Default: the library `make`
	// fetched next to the binary, else the dynamic loader's search path.
	ONNXRuntimeLib string `json:"onnxruntime_lib"`

	// TLS names the certificate to serve. Both files empty: the
	// development CA and leaf under <state_dir>/certs, created when
	// missing. Either way the files are watched and reloaded when they
	// change, and on SIGHUP. ACME's cache_dir defaults to
	// <state_dir>/acme.
	TLS     certs.SourceConfig `json:"tls"`
	Workers WorkersConfig      `json:"workers"`
	// Priority divides RFC 9218 urgencies into the classes every stage
	// acts on: urgent (0..urgent_max) may take reserved slots, runs on the
	// worker loop's own thread and flushes every token; bulk
	// (bulk_min..7) holds its tokens longest and never makes the ring's
	// reader yield; normal is in between. Default {"urgent_max": 2,
	// "bulk_min": 6}; a key left out keeps its default.
	Priority  *priority.Classes `json:"priority"`
	Scheduler scheduler.Config  `json:"scheduler"`
	Gateway   GatewayConfig     `json:"gateway"`
	Auth      AuthConfig        `json:"auth"`
	ZeroRTT   ZeroRTTConfig     `json:"zero_rtt"`
	Tracing   TracingConfig     `json:"tracing"`
	// RateLimits limits each tenant. Default: no limits.
	RateLimits RateLimitsConfig `json:"rate_limits"`
	// Redis is the server instances share state through, for every use
	// (zero_rtt's strike register and session keys, rate_limits) that
	// names no redis_addr of its own.
	Redis RedisConfig `json:"redis"`
	// Models to serve. Empty: the demo model under the name "demo", written
	// into <state_dir>/models/demo/1 when missing.
	Models []ModelConfig `json:"models"`
	// ModelRepository is the versioned model repository the gateway
	// watches. Default: <state_dir>/models when models is empty.
	ModelRepository ModelRepositoryConfig `json:"model_repository"`
	// Upstreams are remote OpenAI-compatible servers (vLLM, SGLang,
	// another h3infer) whose models the gateway serves beside its own
	// workers'. Default: none.
	Upstreams []upstream.Config `json:"upstreams"`
}

// ModelRepositoryConfig is the repository of versioned models,
// dir/NAME/VERSION/ (see docs/MODELS.md).
type ModelRepositoryConfig struct {
	// Dir is the repository's root. Default: <state_dir>/models when no
	// models are listed, else none.
	Dir string `json:"dir"`
	// Poll is how often the repository is read for new versions.
	// Default 2s.
	Poll config.Duration `json:"poll"`
	// AutoPromote switches to a new, higher version as soon as it has
	// loaded and passed its checks; false leaves that to the admin API.
	// Default true.
	AutoPromote *bool `json:"auto_promote"`
	// DrainTimeout bounds how long a retired version waits for its
	// requests before it is unloaded anyway. Default 5m.
	DrainTimeout config.Duration `json:"drain_timeout"`
	// MemoryLimitBytes bounds the host memory the workers' model versions
	// take together, as the registry estimates it: a load (a hot swap
	// holds the old version beside the new) that would pass it is
	// refused. Default 0: no bound.
	MemoryLimitBytes int64 `json:"memory_limit_bytes"`
}

// WorkersConfig sizes the worker processes. Its defaults and ranges are
// those of the packages that own them: workerpool for the processes and
// their rings, workerconf for what each worker runs (Config.pool maps the
// keys).
type WorkersConfig struct {
	// Count of worker processes. Default 0: one per CPU over
	// intra_op_threads, at most 8; 1 when a model asks for a GPU
	// (workerpool.AutoWorkers).
	Count int `json:"count"`
	// Slots is the number of sequences one worker runs at once, its largest
	// decode batch. Default 0: each worker derives them from its KV budget
	// and its models once they are loaded (workerconf.AutoSlots), 4..32.
	Slots int `json:"slots"`
	// KVCacheBytes bounds the KV-cache memory of one worker's running
	// sequences; requests beyond it wait in the worker, most urgent first.
	// Default 1073741824 (1 GiB).
	KVCacheBytes int64 `json:"kv_cache_bytes"`
	// IntraOpThreads per ONNX Runtime session. Default 1.
	IntraOpThreads int `json:"intra_op_threads"`
	// GPUMemoryBytes bounds the device memory of one worker's GPU models,
	// split evenly among the models on a device. Default 0: no bound of
	// ours (the CUDA provider takes what it needs).
	GPUMemoryBytes int64 `json:"gpu_memory_bytes"`
	// RingBytes is the size of each shared-memory ring. Default 1 MiB; a
	// power of two between 64 KiB and 1 GiB.
	RingBytes int `json:"ring_bytes"`
	// CallBuffer is how many unread events one request may hold in the
	// gateway before it is cancelled as too slow. Default 256.
	CallBuffer int `json:"call_buffer"`
	// HangTimeout is how long a ready worker's heartbeat may stand still
	// before the worker is killed and restarted. Default "10s".
	HangTimeout config.Duration `json:"hang_timeout"`
	// Nice is the Linux nice value the worker processes run at, 0..19:
	// above the gateway's, so that where workers and gateway share CPUs
	// the gateway's admission and first-token path is not queued behind
	// model compute. Default 10; 0 runs them at the gateway's priority.
	Nice *int `json:"nice"`
	// WeightsCacheDir holds the prepacked weights of CPU models with
	// external data, built by the first worker that loads one, so that
	// the workers share them and decode at the packed layout's speed
	// (ort's weights cache). Default <state_dir>/cache/weights.
	WeightsCacheDir string `json:"weights_cache_dir"`
	// WeightsCacheDisabled keeps no cache: such models are mapped from
	// their own files without prepacking. Default false.
	WeightsCacheDisabled bool `json:"weights_cache_disabled"`
}

// GatewayConfig is the file's "gateway" section: the gateway's own
// settings (gateway.Config, which checks and defaults them) and the Go
// runtime settings of the process that serves it, which are the
// command's to apply (procs.go).
type GatewayConfig struct {
	gateway.Config
	// GCPercent is the gateway process's garbage-collection target
	// (GOGC): the heap may grow this many percent over what is live before
	// a collection. Default 400; GOGC in the environment wins.
	GCPercent int `json:"gc_percent"`
	// MemoryLimitBytes is a soft limit on the gateway process's memory
	// (GOMEMLIMIT): near it the collector runs as often as it must,
	// whatever gc_percent says. Default 0: none; GOMEMLIMIT in the
	// environment wins.
	MemoryLimitBytes int64 `json:"memory_limit_bytes"`
}

// AuthConfig configures bearer tokens (docs/AUTH.md).
type AuthConfig struct {
	// Disabled serves without tokens. Default false: auth is on.
	Disabled bool `json:"disabled"`
	// Audience tokens must name. Default tlsbind.DefaultAudience, "h3infer".
	Audience string `json:"audience"`
	// KeysFile holds the token signing keys. Default
	// <state_dir>/tokens/keys.json, created when missing.
	KeysFile string `json:"keys_file"`
}

// ZeroRTTConfig configures 0-RTT and its replay protection: the tickets'
// own settings (tlsbind.TicketConfig: instance, trusted_instances,
// max_ticket_age, window), and the stores, routes and peers the command
// wires around them.
type ZeroRTTConfig struct {
	// Disabled turns 0-RTT off. Default false.
	Disabled bool `json:"disabled"`
	// The tickets' own settings (instance, trusted_instances,
	// max_ticket_age, window). A fixed or trusted instance name needs
	// strike_register "redis" (validateInstances).
	tlsbind.TicketConfig
	// SessionKeysFile holds the ticket, token-generator and stateless-reset
	// keys shared by instances. Default <state_dir>/session-keys.json.
	SessionKeysFile string `json:"session_keys_file"`
	// SessionKeysStore is "file" (session_keys_file) or "redis"
	// (redis_addr, else redis.url). Default "file".
	SessionKeysStore string `json:"session_keys_store"`
	// SessionKeysSealFile holds the key that seals the session keys in
	// Redis (AES-256-GCM; 32 bytes in base64, mode 0600). Every instance
	// sharing the Redis needs the same file. Default
	// <state_dir>/session-keys.seal, created when missing.
	SessionKeysSealFile string `json:"session_keys_seal_file"`
	// The session keys' rotation (ticket_key_rotation).
	certs.RotatorConfig
	// StrikeRegister is "memory" (one instance) or "redis". Default "memory".
	StrikeRegister string `json:"strike_register"`
	// RedisAddr is the Redis of strike_register "redis" and
	// session_keys_store "redis", in any form redis.url takes. Default:
	// redis.url.
	RedisAddr string `json:"redis_addr"`
	// Routes maps a route path (one of gateway.EarlyDataRoutes:
	// /v1/chat/completions, /v1/completions, /v1/models, /v1/models/) to
	// serve, proof, wait or reject. Default: serve for the model routes,
	// proof for the completion routes.
	Routes map[string]tlsbind.EarlyPolicy `json:"routes"`
	// TrustedProxies are the intermediaries whose Early-Data: 1 header is
	// believed, as CIDR prefixes ("10.0.0.0/8") or single addresses,
	// matched against the connection's peer address. From any other peer
	// the header is ignored. Default: none.
	TrustedProxies []string `json:"trusted_proxies"`
}

// RedisConfig says how to reach Redis (docs/CONFIG.md, "Redis").
type RedisConfig struct {
	// URL is redis://[user:password@]host:port[/db], rediss://... for
	// TLS, unix:///path/to/socket, a bare host:port or a socket path.
	// Default: none.
	URL string `json:"url"`
	// CAFile is a PEM bundle trusted for rediss:// connections, those of
	// redis.url and of the sections' own redis_addr alike. Default: the
	// system roots.
	CAFile string `json:"ca_file"`
}

// TracingConfig turns on OpenTelemetry export. The standard OTEL_*
// environment variables work as well and configure the rest (headers,
// sampler, batching); with neither, tracing is off.
type TracingConfig struct {
	// OTLPEndpoint is the OTLP/HTTP traces URL, such as
	// "http://127.0.0.1:4318/v1/traces". Default: none.
	OTLPEndpoint string `json:"otlp_endpoint"`
}

// RateLimitsConfig is the file's rate_limits section: the limits
// themselves (gateway.RateLimits, which checks them) and the store that
// keeps their buckets, which the command opens.
type RateLimitsConfig struct {
	gateway.RateLimits
	// Store is "local" (each instance alone) or "redis" (one budget shared
	// by every instance using the same Redis). Default "local".
	Store string `json:"store"`
	// RedisAddr is the Redis of store "redis", in any form redis.url
	// takes. Default: redis.url.
	RedisAddr string `json:"redis_addr"`
	// RedisPrefix starts every key the limits write. Default "h3infer:rl:".
	RedisPrefix string `json:"redis_prefix"`
}

// ModelConfig names one model directory (model.onnx, tokenizer.json,
// model.json) and where it runs: name, dir, provider (cpu, cuda, tensorrt
// or auto: cuda when its libraries and a device load, else cpu with a
// warning; default cpu; docs/GPU.md), device_id (the GPU of a cuda,
// tensorrt or auto model; default 0) and device_kv (the KV cache kept in
// the provider's memory between decode steps; default: true on a GPU,
// false on the cpu). The workers take it as it is, so workerconf owns its
// keys and their validation.
type ModelConfig = workerconf.Model

// loadConfig reads a config file strictly; an empty path gives the defaults.
func loadConfig(path string) (Config, error) {
	var c Config
	if path == "" {
		return c, nil
	}
	// A key the file leaves out of priority keeps its default; one it
	// names, 0 included, is taken as written.
	classes := priority.DefaultClasses
	c.Priority = &classes
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("config: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	if dec.More() {
		return c, fmt.Errorf("config %s: trailing data after the JSON object", path)
	}
	return c, nil
}

// defaultWorkerNice is workers.nice's default.
const defaultWorkerNice = workerconf.DefaultNice

// pool is the workers section and the models as the worker pool takes
// them; withDefaults and validate leave their defaults and ranges to it.
func (c Config) pool() workerpool.Config {
	w := c.Workers
	p := workerpool.Config{
		Workers:     w.Count,
		RingSize:    w.RingBytes,
		CallBuffer:  w.CallBuffer,
		HangTimeout: time.Duration(w.HangTimeout),
		Worker: workerconf.Settings{
			Models:         c.Models,
			Slots:          w.Slots,
			KVCacheBytes:   w.KVCacheBytes,
			IntraOpThreads: w.IntraOpThreads,
			GPUMemoryBytes: w.GPUMemoryBytes,
			Nice:           w.Nice,
		},
	}
	if !w.WeightsCacheDisabled {
		p.Worker.WeightsCacheDir = w.WeightsCacheDir
	}
	return p
}

// workersSection is the workers section p stands for, the inverse of
// Config.pool; p cannot say whether the weights cache was disabled (it
// holds no directory then), so weights_cache_disabled is left false.
func workersSection(p workerpool.Config) WorkersConfig {
	return WorkersConfig{
		Count:           p.Workers,
		Slots:           p.Worker.Slots,
		KVCacheBytes:    p.Worker.KVCacheBytes,
		IntraOpThreads:  p.Worker.IntraOpThreads,
		GPUMemoryBytes:  p.Worker.GPUMemoryBytes,
		RingBytes:       p.RingSize,
		CallBuffer:      p.CallBuffer,
		HangTimeout:     config.Duration(p.HangTimeout),
		Nice:            p.Worker.Nice,
		WeightsCacheDir: p.Worker.WeightsCacheDir,
	}
}

// leastSlots is the fewest slots a worker may have: workers.slots, or
// when the workers derive them, the least they derive.
func (c Config) leastSlots() int {
	if c.Workers.Slots == 0 {
		return workerconf.MinAutoSlots
	}
	return c.Workers.Slots
}

// withDefaults fills zero values with the documented defaults.
func (c Config) withDefaults() Config {
	def := func(v *string, d string) {
		if *v == "" {
			*v = d
		}
	}
	defInt := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.Listen, gateway.DefaultListen)
	def(&c.Admin, gateway.DefaultAdmin)
	def(&c.StateDir, ".h3infer")
	noCache := c.Workers.WeightsCacheDisabled
	c.Workers = workersSection(c.pool().WithDefaults())
	c.Workers.WeightsCacheDisabled = noCache
	if !noCache {
		def(&c.Workers.WeightsCacheDir, filepath.Join(c.StateDir, "cache", "weights"))
	}
	if c.Scheduler.UrgentReserve == nil {
		// A worker always keeps one slot for everyone, so a single-slot
		// worker has none to reserve.
		c.Scheduler.UrgentReserve = new(min(scheduler.DefaultUrgentReserve, max(0, c.leastSlots()-1)))
	}
	c.Scheduler = c.Scheduler.WithDefaults()
	if c.Priority == nil {
		classes := priority.DefaultClasses
		c.Priority = &classes
	}
	// The file writes the gateway's addresses at its top level.
	c.Gateway.Listen, c.Gateway.Admin, c.Gateway.AdminHosts = c.Listen, c.Admin, c.AdminHosts
	c.Gateway.Config = c.Gateway.Config.WithDefaults()
	defInt(&c.Gateway.GCPercent, defaultGCPercent)
	def(&c.Auth.Audience, tlsbind.DefaultAudience)
	def(&c.Auth.KeysFile, filepath.Join(c.StateDir, "tokens", "keys.json"))
	c.ZeroRTT.TicketConfig = c.ZeroRTT.TicketConfig.WithDefaults()
	def(&c.ZeroRTT.SessionKeysFile, filepath.Join(c.StateDir, "session-keys.json"))
	def(&c.ZeroRTT.SessionKeysSealFile, filepath.Join(c.StateDir, "session-keys.seal"))
	def(&c.ZeroRTT.StrikeRegister, "memory")
	def(&c.RateLimits.Store, "local")
	def(&c.RateLimits.RedisPrefix, "h3infer:rl:")
	c.RateLimits.RateLimits = c.RateLimits.RateLimits.WithDefaults()
	if c.ModelRepository.Dir == "" && len(c.Models) == 0 {
		c.ModelRepository.Dir = filepath.Join(c.StateDir, "models")
	}
	if c.ModelRepository.Poll == 0 {
		c.ModelRepository.Poll = config.Duration(2 * time.Second)
	}
	if c.ModelRepository.AutoPromote == nil {
		c.ModelRepository.AutoPromote = new(true)
	}
	if c.ModelRepository.DrainTimeout == 0 {
		c.ModelRepository.DrainTimeout = config.Duration(5 * time.Minute)

	}
	def(&c.ZeroRTT.SessionKeysStore, "file")
	c.ZeroRTT.RotatorConfig = c.ZeroRTT.RotatorConfig.WithDefaults()
	c.TLS = c.TLS.WithDefaults()
	if len(c.TLS.ACME.Hosts) > 0 {
		def(&c.TLS.ACME.CacheDir, filepath.Join(c.StateDir, "acme"))
	}
	return c
}

// validate reports every problem at once, each naming its key. It runs on a
// config with defaults applied, before any socket opens.
func (c Config) validate() error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, a...)))
	}
	for key, addr := range map[string]string{"listen": c.Listen, "admin": c.Admin} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			bad(key, "want host:port, got %q", addr)
		}
	}
	if c.Listen == c.Admin && c.Listen != "" && !hasPortZero(c.Listen) {
		bad("admin", "must differ from listen, both are %q", c.Listen)
	}
	errs = append(errs, c.TLS.Validate())
	// The workers section and the models, each problem naming its key.
	if err := c.pool().Validate(); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, c.Scheduler.Validate())
	errs = append(errs, c.Gateway.Validate())
	if p := c.Gateway.GCPercent; p < minGCPercent || p > maxGCPercent {
		bad("gateway.gc_percent", "must be %d..%d, got %d", minGCPercent, maxGCPercent, p)
	}
	if c.Gateway.MemoryLimitBytes < 0 {
		bad("gateway.memory_limit_bytes", "must be >= 0, got %d", c.Gateway.MemoryLimitBytes)
	}
	errs = append(errs, c.Priority.Validate("priority")...)
	// The scheduler checks the rest; it learns the slots only from its
	// backends.
	if r, slots := *c.Scheduler.UrgentReserve, c.leastSlots(); r > 0 && r >= slots {
		if c.Workers.Slots == 0 {
			bad("scheduler.urgent_reserve", "must be 0..%d: workers.slots is derived, at least %d, got %d", slots-1, slots, r)
		} else {
			bad("scheduler.urgent_reserve", "must be 0..workers.slots-1 (%d), got %d", slots-1, r)
		}
	}
	errs = append(errs, c.ZeroRTT.TicketConfig.Validate())
	if s := c.ZeroRTT.StrikeRegister; s != "memory" && s != "redis" {
		bad("zero_rtt.strike_register", "want memory or redis, got %q", s)
	}
	c.validateInstances(bad)
	if s := c.ZeroRTT.SessionKeysStore; s != "file" && s != "redis" {
		bad("zero_rtt.session_keys_store", "want file or redis, got %q", s)
	}
	c.validateRedis(bad)
	errs = append(errs, c.ZeroRTT.RotatorConfig.Validate())
	errs = append(errs, gateway.ValidateEarlyData("zero_rtt.routes", c.ZeroRTT.Routes)...)
	for i, s := range c.ZeroRTT.TrustedProxies {
		if _, err := gateway.ParseTrustedProxy(s); err != nil {
			bad(fmt.Sprintf("zero_rtt.trusted_proxies[%d]", i), "%v", err)
		}
	}
	// Checked here as well as by SetRateLimits, so that a reload with bad
	// limits is refused before anything of it applies.
	errs = append(errs, c.RateLimits.Validate())
	if s := c.RateLimits.Store; s != "local" && s != "redis" {
		bad("rate_limits.store", "want \"local\" or \"redis\", got %q", s)
	}
	errs = append(errs, gateway.ValidateAdminHosts("admin_hosts", c.AdminHosts)...)
	errs = append(errs, upstream.ValidateAll(c.Upstreams))
	if e := c.Tracing.OTLPEndpoint; e != "" && !strings.HasPrefix(e, "http://") && !strings.HasPrefix(e, "https://") {
		bad("tracing.otlp_endpoint", "want an http:// or https:// URL, got %q", e)
	}
	if c.ModelRepository.Poll < 0 {
		bad("model_repository.poll", "must be > 0, got %s", time.Duration(c.ModelRepository.Poll))
	}
	if c.ModelRepository.DrainTimeout < 0 {
		bad("model_repository.drain_timeout", "must be > 0, got %s", time.Duration(c.ModelRepository.DrainTimeout))
	}
	if c.ModelRepository.MemoryLimitBytes < 0 {
		bad("model_repository.memory_limit_bytes", "must be >= 0, got %d", c.ModelRepository.MemoryLimitBytes)
	}
	// What the pool cannot see from the settings alone: a directory that
	// holds no model.
	for i, m := range c.Models {
		if _, synth, _ := workerconf.ParseSynthetic(m.Dir); synth || m.Dir == "" {
			continue
		}
		if _, err := os.Stat(filepath.Join(m.Dir, workerconf.ModelFile)); err != nil {
			bad(fmt.Sprintf("models[%d].dir", i), "no model.onnx: %v", err)
		}
	}
	return errors.Join(errs...)
}

// validateInstances refuses instance names that would let a ticket carry
// 0-RTT at a server whose strike register never saw it used. Instances
// that share ticket keys (the session keys file or Redis) resume each
// other's tickets; RFC 8446 section 8 holds only if every server that
// accepts one in 0-RTT consults the same register. With a per-process
// register that is one process, which the default name (random at each
// start) guarantees; a fixed or trusted name says several processes (other
// instances, or this one after a restart) accept each other's tickets, so
// it needs the shared register. An error, not 0-RTT quietly turned off:
// the operator asked for 0-RTT across instances and should learn at once
// that it needs Redis.
func (c Config) validateInstances(bad func(key, format string, args ...any)) {
	z := c.ZeroRTT
	if z.StrikeRegister != "memory" || z.Disabled || c.Auth.Disabled {
		return
	}
	if z.Instance != "" {
		bad("zero_rtt.instance", "a fixed name (%q) lets other instances, and this one after a restart, accept its tickets in 0-RTT, which needs one strike register for all: set strike_register \"redis\", or leave instance unset for a name of its own at each start", z.Instance)
	}
	if len(z.Trusted) > 0 {
		bad("zero_rtt.trusted_instances", "trusting %q for 0-RTT needs a strike register they share: set strike_register \"redis\", or leave trusted_instances empty", z.Trusted)
	}
}

func isLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func hasPortZero(addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	return err == nil && port == "0"
}
