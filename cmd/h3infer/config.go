package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"h3infer/gateway"
	"h3infer/priority"
	"h3infer/tlsbind"
	"h3infer/workerconf"
	"h3infer/workerpool"
)

// Config is the one typed configuration file of `h3infer serve` (JSON). It
// is decoded strictly: an unknown key is an error. A zero value means the
// documented default; an out-of-range value is an error, never clamped.
// docs/CONFIG.md documents every key.
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
	// AdminToken, when set, is required as a bearer token on every admin
	// route but /healthz and /readyz. Default: none on a loopback admin
	// address; on any other, serve generates one into
	// <state_dir>/tokens/admin.token (mode 0600) and keeps it.
	AdminToken string `json:"admin_token"`
	// StateDir holds development certificates and the demo model.
	// Default .h3infer under the working directory.
	StateDir string `json:"state_dir"`
	// ONNXRuntimeLib is the path of libonnxruntime.so; the environment
	// variable ONNXRUNTIME_LIB overrides it. Default: the library `make`
	// fetched next to the binary, else the dynamic loader's search path.
	ONNXRuntimeLib string `json:"onnxruntime_lib"`

	TLS     TLSConfig     `json:"tls"`
	Workers WorkersConfig `json:"workers"`
	// Priority divides RFC 9218 urgencies into the classes every stage
	// acts on: urgent (0..urgent_max) may take reserved slots, runs on the
	// worker loop's own thread and flushes every token; bulk
	// (bulk_min..7) holds its tokens longest and never makes the ring's
	// reader yield; normal is in between. Default {"urgent_max": 2,
	// "bulk_min": 6}; a key left out keeps its default.
	Priority  *priority.Classes `json:"priority"`
	Scheduler SchedulerConfig   `json:"scheduler"`
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
}

// ModelRepositoryConfig is the repository of versioned models,
// dir/NAME/VERSION/ (see docs/MODELS.md).
type ModelRepositoryConfig struct {
	// Dir is the repository's root. Default: <state_dir>/models when no
	// models are listed, else none.
	Dir string `json:"dir"`
	// Poll is how often the repository is read for new versions.
	// Default 2s.
	Poll Duration `json:"poll"`
	// AutoPromote switches to a new, higher version as soon as it has
	// loaded and passed its checks; false leaves that to the admin API.
	// Default true.
	AutoPromote *bool `json:"auto_promote"`
	// DrainTimeout bounds how long a retired version waits for its
	// requests before it is unloaded anyway. Default 5m.
	DrainTimeout Duration `json:"drain_timeout"`
}

// TLSConfig names a certificate to serve. Both empty: the development CA and
// leaf under <state_dir>/certs, created when missing. Either way the files
// are watched and reloaded when they change, and on SIGHUP.
type TLSConfig struct {
	CertFile string `json:"cert_file"`
	KeyFile  string `json:"key_file"`
	// WatchInterval is how often the files are checked for changes.
	// Default "5s".
	WatchInterval Duration `json:"watch_interval"`
	// ACME obtains certificates for public names from an ACME CA; other
	// names keep the certificate above.
	ACME ACMEConfig `json:"acme"`
}

// ACMEConfig turns on ACME (tls-alpn-01 on the listen port, which must be
// reachable on 443 from the CA) for the listed hosts.
type ACMEConfig struct {
	// Hosts are public DNS names. Empty: ACME is off.
	Hosts []string `json:"hosts"`
	// DirectoryURL of the CA. Default: autocert's default public CA.
	DirectoryURL string `json:"directory_url"`
	// Email is the account contact, optional.
	Email string `json:"email"`
	// CacheDir keeps the account key and certificates. Default
	// <state_dir>/acme.
	CacheDir string `json:"cache_dir"`
	// CAFile is a PEM bundle to trust for the directory's HTTPS, for a
	// private CA. Default: the system roots.
	CAFile string `json:"ca_file"`
}

// WorkersConfig sizes the worker processes. Its defaults and ranges are
// those of the packages that own them: workerpool for the processes and
// their rings, workerconf for what each worker runs (Config.pool maps the
// keys).
type WorkersConfig struct {
	// Count of worker processes. Default 2.
	Count int `json:"count"`
	// Slots is the number of sequences one worker runs at once, its largest
	// decode batch. Default 4.
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
	HangTimeout Duration `json:"hang_timeout"`
	// Nice is the Linux nice value the worker processes run at, 0..19:
	// above the gateway's, so that where workers and gateway share CPUs
	// the gateway's admission and first-token path is not queued behind
	// model compute. Default 10; 0 runs them at the gateway's priority.
	Nice *int `json:"nice"`
}

// SchedulerConfig bounds admission.
type SchedulerConfig struct {
	// MaxQueue is how many requests may wait for a worker slot. Default 256.
	MaxQueue int `json:"max_queue"`
	// RetryAfter is the advice sent with 503 and 429 answers. Default "1s".
	RetryAfter Duration `json:"retry_after"`
	// Aging is how long a queued request waits before it competes one
	// urgency level higher. Default "2s".
	Aging Duration `json:"aging"`
	// UrgentReserve is how many slots per worker only urgent requests may
	// take, so that an urgent request need not wait for a bulk one to
	// finish. Default 1 (0 when workers.slots is 1); 0 turns it off.
	UrgentReserve *int `json:"urgent_reserve"`
	// Tenants and their shares. Without any, every request belongs to the
	// tenant "default" (weight 1, default urgency 3, ceiling 0).
	Tenants []TenantConfig `json:"tenants"`
}

// TenantConfig is one tenant's share of the workers.
type TenantConfig struct {
	Name string `json:"name"`
	// Weight is the tenant's share among tenants queued at the same
	// urgency, in tokens asked for. Default 1.
	Weight int `json:"weight"`
	// DefaultUrgency applies when a request has no Priority header.
	// Default 3 (RFC 9218's default); 0..7.
	DefaultUrgency *int `json:"default_urgency"`
	// UrgencyCeiling is the most urgent level the tenant may claim; a
	// request asking for more gets this. Default 0 (no limit); 0..7, at most
	// default_urgency.
	UrgencyCeiling *int `json:"urgency_ceiling"`
	// MaxQueue bounds the tenant's queued requests; beyond it, 429. Default
	// 0: only scheduler.max_queue applies.
	MaxQueue int `json:"max_queue"`
}

// GatewayConfig shapes the HTTP side.
type GatewayConfig struct {
	// MaxBodyBytes bounds a request body. Default 1048576.
	MaxBodyBytes int64 `json:"max_body_bytes"`
	// DefaultMaxTokens applies when a request names no max_tokens. Default 256.
	DefaultMaxTokens int `json:"default_max_tokens"`
	// MaxStreams is how many requests one client connection may have in
	// flight at once (HTTP/3 streams, HTTP/2 concurrent streams). Default
	// 1024.
	MaxStreams int `json:"max_streams"`
	// PreauthStreams is how many requests an HTTP/3 connection may have
	// in handlers until one of its requests has passed authentication;
	// max_streams applies after (and from the start with auth disabled).
	// Streams past it wait in the QUIC stack without a goroutine. A
	// browser opens at most about 100 at once. Default 100, or
	// max_streams when that is lower.
	PreauthStreams int `json:"preauth_streams"`
	// HeaderTimeout is how long a request may take to send its headers:
	// per stream over HTTP/3 (a late stream is reset), per connection
	// over TCP. Default "10s".
	HeaderTimeout Duration `json:"header_timeout"`
	// AuthTimeout is how long a client connection may stay open without
	// one of its requests passing authentication; then it is closed, so
	// that connections which never authenticate cannot hold
	// max_connections for good. Ignored with auth disabled. Default "30s".
	AuthTimeout Duration `json:"auth_timeout"`
	// MaxConnections bounds client connections over both listeners
	// together; past it new ones are refused. Default: sized for the
	// machine, a quarter of its memory at 2 MiB per connection (the most
	// one that has not authenticated can hold at preauth_streams),
	// 256..65536: 512 with 4 GiB, 8192 with 64 GiB.
	MaxConnections int `json:"max_connections"`
	// MaxConnectionsPerSource bounds the connections of one source
	// address (IPv4 address, IPv6 /64), counted once the address is
	// proven. Default 64: a browser uses one connection per origin, and
	// a carrier-grade NAT address may front dozens of users at once.
	MaxConnectionsPerSource int `json:"max_connections_per_source"`
	// GCPercent is the gateway process's garbage-collection target
	// (GOGC): the heap may grow this many percent over what is live before
	// a collection. Default 400; GOGC in the environment wins.
	GCPercent int `json:"gc_percent"`
	// MemoryLimitBytes is a soft limit on the gateway process's memory
	// (GOMEMLIMIT): near it the collector runs as often as it must,
	// whatever gc_percent says. Default 0: none; GOMEMLIMIT in the
	// environment wins.
	MemoryLimitBytes int64 `json:"memory_limit_bytes"`
	// Deadline is each request's default deadline. Default "30s".
	Deadline Duration `json:"deadline"`
	// MaxDeadline caps X-Request-Timeout. Default "5m".
	MaxDeadline Duration       `json:"max_deadline"`
	Coalesce    CoalesceConfig `json:"coalesce"`
	// ShutdownGrace is how long streams in flight may run after SIGTERM;
	// those still running then end with an error event. Default "10s".
	ShutdownGrace Duration `json:"shutdown_grace"`
}

// CoalesceConfig shapes how the SSE writer batches tokens by urgency.
type CoalesceConfig struct {
	// Window: normal requests (see priority) hold tokens this long.
	// Default "10ms".
	Window Duration `json:"window"`
	// BulkWindow: bulk requests hold tokens this long. Default "25ms".
	BulkWindow Duration `json:"bulk_window"`
	// MaxAckDelay bounds both windows. Default "25ms".
	MaxAckDelay Duration `json:"max_ack_delay"`
	// MaxBuffer flushes early at this many bytes. Default 4096.
	MaxBuffer int `json:"max_buffer"`
}

// AuthConfig configures bearer tokens (docs/AUTH.md).
type AuthConfig struct {
	// Disabled serves without tokens. Default false: auth is on.
	Disabled bool `json:"disabled"`
	// Audience tokens must name. Default "h3infer".
	Audience string `json:"audience"`
	// KeysFile holds the token signing keys. Default
	// <state_dir>/tokens/keys.json, created when missing.
	KeysFile string `json:"keys_file"`
}

// ZeroRTTConfig configures 0-RTT and its replay protection.
type ZeroRTTConfig struct {
	// Disabled turns 0-RTT off. Default false.
	Disabled bool `json:"disabled"`
	// Instance names this gateway in its session tickets; a ticket that
	// names another instance resumes but carries no 0-RTT. Default: a
	// random name made at each start, so that 0-RTT is only accepted on
	// tickets this process issued, which its own strike register saw
	// used. A fixed name (shared by several instances, or kept across
	// restarts) needs strike_register "redis".
	Instance string `json:"instance"`
	// TrustedInstances may issue tickets that carry 0-RTT here. Default
	// none; needs strike_register "redis".
	TrustedInstances []string `json:"trusted_instances"`
	// MaxTicketAge bounds a ticket's age for 0-RTT. Default "24h".
	MaxTicketAge Duration `json:"max_ticket_age"`
	// Window is the early proofs' freshness window. Default "10s".
	Window Duration `json:"window"`
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
	// TicketKeyRotation is the age at which the ticket key is replaced;
	// the previous one still decrypts until the next rotation. Default
	// "12h".
	TicketKeyRotation Duration `json:"ticket_key_rotation"`
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
	Routes map[string]string `json:"routes"`
	// TrustedProxies are the intermediaries whose Early-Data: 1 header is
	// believed, as CIDR prefixes ("10.0.0.0/8") or single addresses,
	// matched against the connection's peer address. From any other peer
	// the header is ignored. Default: none.
	TrustedProxies []string `json:"trusted_proxies"`
}

// parseTrustedProxy reads one zero_rtt.trusted_proxies entry: a prefix in
// its masked form, or a single address.
func parseTrustedProxy(s string) (netip.Prefix, error) {
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

// RateLimitsConfig is gateway.RateLimits as a file.
type RateLimitsConfig struct {
	Default TenantLimitConfig            `json:"default"`
	Tenants map[string]TenantLimitConfig `json:"tenants"`
	// CutOff ends a stream over its output-token rate with an error
	// instead of pacing it. Default false.
	CutOff bool `json:"cut_off"`
	// Store is "local" (each instance alone) or "redis" (one budget shared
	// by every instance using the same Redis). Default "local".
	Store string `json:"store"`
	// RedisAddr is the Redis of store "redis", in any form redis.url
	// takes. Default: redis.url.
	RedisAddr string `json:"redis_addr"`
	// RedisPrefix starts every key the limits write. Default "h3infer:rl:".
	RedisPrefix string `json:"redis_prefix"`
	// StoreRetry is how long, after the shared store failed, each instance
	// decides alone with the same limits before it tries the store again.
	// Default "1s"; 10ms..1m.
	StoreRetry Duration `json:"store_retry"`
}

// TenantLimitConfig is one tenant's limits; 0 means no limit of that kind.
type TenantLimitConfig struct {
	RequestsPerSecond     float64 `json:"requests_per_second"`
	RequestBurst          int     `json:"request_burst"`
	OutputTokensPerSecond float64 `json:"output_tokens_per_second"`
	OutputTokenBurst      int     `json:"output_token_burst"`
	MaxConcurrent         int     `json:"max_concurrent"`
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

// Duration is a time.Duration written as a string such as "800ms".
type Duration time.Duration

// UnmarshalJSON accepts Go duration strings.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a duration string such as \"800ms\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

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
	return workerpool.Config{
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
}

// workersSection is the workers section p stands for, the inverse of
// Config.pool.
func workersSection(p workerpool.Config) WorkersConfig {
	return WorkersConfig{
		Count:          p.Workers,
		Slots:          p.Worker.Slots,
		KVCacheBytes:   p.Worker.KVCacheBytes,
		IntraOpThreads: p.Worker.IntraOpThreads,
		GPUMemoryBytes: p.Worker.GPUMemoryBytes,
		RingBytes:      p.RingSize,
		CallBuffer:     p.CallBuffer,
		HangTimeout:    Duration(p.HangTimeout),
		Nice:           p.Worker.Nice,
	}
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
	def(&c.Listen, "127.0.0.1:8443")
	def(&c.Admin, "127.0.0.1:9090")
	def(&c.StateDir, ".h3infer")
	c.Workers = workersSection(c.pool().WithDefaults())
	if c.Scheduler.UrgentReserve == nil {
		// A worker always keeps one slot for everyone, so a single-slot
		// worker has none to reserve.
		c.Scheduler.UrgentReserve = new(max(0, min(1, c.Workers.Slots-1)))
	}
	defInt(&c.Scheduler.MaxQueue, 256)
	if c.Scheduler.RetryAfter == 0 {
		c.Scheduler.RetryAfter = Duration(time.Second)
	}
	if c.Scheduler.Aging == 0 {
		c.Scheduler.Aging = Duration(2 * time.Second)
	}
	if c.Priority == nil {
		classes := priority.DefaultClasses
		c.Priority = &classes
	}
	for i := range c.Scheduler.Tenants {
		t := &c.Scheduler.Tenants[i]
		defInt(&t.Weight, 1)
		if t.DefaultUrgency == nil {
			t.DefaultUrgency = new(3)
		}
		if t.UrgencyCeiling == nil {
			t.UrgencyCeiling = new(0)
		}
	}
	if c.Gateway.Deadline == 0 {
		c.Gateway.Deadline = Duration(30 * time.Second)
	}
	if c.Gateway.MaxDeadline == 0 {
		c.Gateway.MaxDeadline = Duration(5 * time.Minute)
	}
	co := &c.Gateway.Coalesce
	defInt(&co.MaxBuffer, 4096)
	if co.Window == 0 {
		co.Window = Duration(10 * time.Millisecond)
	}
	if co.BulkWindow == 0 {
		co.BulkWindow = Duration(25 * time.Millisecond)
	}
	if co.MaxAckDelay == 0 {
		co.MaxAckDelay = Duration(25 * time.Millisecond)
	}
	if c.Gateway.MaxBodyBytes == 0 {
		c.Gateway.MaxBodyBytes = 1 << 20
	}
	defInt(&c.Gateway.DefaultMaxTokens, 256)
	defInt(&c.Gateway.MaxStreams, 1024)
	defInt(&c.Gateway.PreauthStreams, min(gateway.DefaultPreauthStreams, c.Gateway.MaxStreams))
	if c.Gateway.HeaderTimeout == 0 {
		c.Gateway.HeaderTimeout = Duration(gateway.DefaultHeaderTimeout)
	}
	if c.Gateway.AuthTimeout == 0 {
		c.Gateway.AuthTimeout = Duration(gateway.DefaultAuthTimeout)
	}
	defInt(&c.Gateway.MaxConnections, gateway.DefaultMaxConnections())
	defInt(&c.Gateway.MaxConnectionsPerSource, gateway.DefaultMaxConnectionsPerSource)
	defInt(&c.Gateway.GCPercent, 400)
	def(&c.Auth.Audience, "h3infer")
	def(&c.Auth.KeysFile, filepath.Join(c.StateDir, "tokens", "keys.json"))
	if c.ZeroRTT.MaxTicketAge == 0 {
		c.ZeroRTT.MaxTicketAge = Duration(24 * time.Hour)
	}
	if c.ZeroRTT.Window == 0 {
		c.ZeroRTT.Window = Duration(10 * time.Second)
	}
	def(&c.ZeroRTT.SessionKeysFile, filepath.Join(c.StateDir, "session-keys.json"))
	def(&c.ZeroRTT.SessionKeysSealFile, filepath.Join(c.StateDir, "session-keys.seal"))
	def(&c.ZeroRTT.StrikeRegister, "memory")
	def(&c.RateLimits.Store, "local")
	def(&c.RateLimits.RedisPrefix, "h3infer:rl:")
	if c.RateLimits.StoreRetry == 0 {
		c.RateLimits.StoreRetry = Duration(time.Second)
	}
	if c.ModelRepository.Dir == "" && len(c.Models) == 0 {
		c.ModelRepository.Dir = filepath.Join(c.StateDir, "models")
	}
	if c.ModelRepository.Poll == 0 {
		c.ModelRepository.Poll = Duration(2 * time.Second)
	}
	if c.ModelRepository.AutoPromote == nil {
		c.ModelRepository.AutoPromote = new(true)
	}
	if c.ModelRepository.DrainTimeout == 0 {
		c.ModelRepository.DrainTimeout = Duration(5 * time.Minute)

	}
	def(&c.ZeroRTT.SessionKeysStore, "file")
	if c.ZeroRTT.TicketKeyRotation == 0 {
		c.ZeroRTT.TicketKeyRotation = Duration(12 * time.Hour)
	}
	if c.TLS.WatchInterval == 0 {
		c.TLS.WatchInterval = Duration(5 * time.Second)
	}
	if len(c.TLS.ACME.Hosts) > 0 {
		def(&c.TLS.ACME.CacheDir, filepath.Join(c.StateDir, "acme"))
	}
	if c.Gateway.ShutdownGrace == 0 {
		c.Gateway.ShutdownGrace = Duration(10 * time.Second)
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
	if (c.TLS.CertFile == "") != (c.TLS.KeyFile == "") {
		bad("tls", "cert_file and key_file go together, got cert_file=%q key_file=%q", c.TLS.CertFile, c.TLS.KeyFile)
	}
	// The workers section and the models, each problem naming its key.
	if err := c.pool().Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.Scheduler.MaxQueue < 1 {
		bad("scheduler.max_queue", "must be > 0, got %d", c.Scheduler.MaxQueue)
	}
	if c.Scheduler.RetryAfter < 0 {
		bad("scheduler.retry_after", "must be positive, got %s", time.Duration(c.Scheduler.RetryAfter))
	}
	if c.Gateway.MaxBodyBytes < 1024 {
		bad("gateway.max_body_bytes", "must be at least 1024, got %d", c.Gateway.MaxBodyBytes)
	}
	if c.Gateway.DefaultMaxTokens < 1 {
		bad("gateway.default_max_tokens", "must be > 0, got %d", c.Gateway.DefaultMaxTokens)
	}
	if c.Gateway.GCPercent < 25 || c.Gateway.GCPercent > 10000 {
		bad("gateway.gc_percent", "must be 25..10000, got %d", c.Gateway.GCPercent)
	}
	if c.Gateway.MemoryLimitBytes < 0 {
		bad("gateway.memory_limit_bytes", "must be >= 0, got %d", c.Gateway.MemoryLimitBytes)
	}
	if c.Gateway.MaxStreams < 1 || c.Gateway.MaxStreams > 65536 {
		bad("gateway.max_streams", "must be 1..65536, got %d", c.Gateway.MaxStreams)
	}
	if c.Gateway.PreauthStreams < 1 || c.Gateway.PreauthStreams > c.Gateway.MaxStreams {
		bad("gateway.preauth_streams", "must be 1..max_streams (%d), got %d", c.Gateway.MaxStreams, c.Gateway.PreauthStreams)
	}
	if c.Gateway.HeaderTimeout < 0 {
		bad("gateway.header_timeout", "must be positive, got %s", time.Duration(c.Gateway.HeaderTimeout))
	}
	if c.Gateway.AuthTimeout < 0 {
		bad("gateway.auth_timeout", "must be positive, got %s", time.Duration(c.Gateway.AuthTimeout))
	}
	if c.Gateway.MaxConnections < 1 {
		bad("gateway.max_connections", "must be > 0, got %d", c.Gateway.MaxConnections)
	}
	if c.Gateway.MaxConnectionsPerSource < 1 || c.Gateway.MaxConnectionsPerSource > c.Gateway.MaxConnections {
		bad("gateway.max_connections_per_source", "must be 1..max_connections (%d), got %d", c.Gateway.MaxConnections, c.Gateway.MaxConnectionsPerSource)
	}
	if c.Scheduler.Aging < 0 {
		bad("scheduler.aging", "must be positive, got %s", time.Duration(c.Scheduler.Aging))
	}
	errs = append(errs, c.Priority.Validate("priority")...)
	if r := *c.Scheduler.UrgentReserve; r < 0 || r >= c.Workers.Slots && r > 0 {
		bad("scheduler.urgent_reserve", "must be 0..workers.slots-1 (%d), got %d", c.Workers.Slots-1, r)
	}
	tenants := map[string]bool{}
	for i, t := range c.Scheduler.Tenants {
		key := fmt.Sprintf("scheduler.tenants[%d]", i)
		if t.Name == "" {
			bad(key+".name", "must not be empty")
		} else if tenants[t.Name] {
			bad(key+".name", "%q is listed twice", t.Name)
		}
		tenants[t.Name] = true
		if t.Weight < 1 || t.Weight > 1000 {
			bad(key+".weight", "must be 1..1000, got %d", t.Weight)
		}
		if u := *t.DefaultUrgency; u < 0 || u > 7 {
			bad(key+".default_urgency", "must be 0..7, got %d", u)
		}
		if u := *t.UrgencyCeiling; u < 0 || u > 7 || u > *t.DefaultUrgency {
			bad(key+".urgency_ceiling", "must be 0..default_urgency (%d), got %d", *t.DefaultUrgency, u)
		}
		if t.MaxQueue < 0 {
			bad(key+".max_queue", "must be >= 0, got %d", t.MaxQueue)
		}
	}
	if c.Gateway.Deadline < 0 || c.Gateway.Deadline > c.Gateway.MaxDeadline {
		bad("gateway.deadline", "must be positive and at most gateway.max_deadline (%s), got %s", time.Duration(c.Gateway.MaxDeadline), time.Duration(c.Gateway.Deadline))
	}
	co := c.Gateway.Coalesce
	for key, d := range map[string]Duration{"gateway.coalesce.window": co.Window, "gateway.coalesce.bulk_window": co.BulkWindow} {
		if d < 0 || d > co.MaxAckDelay {
			bad(key, "must be positive and at most gateway.coalesce.max_ack_delay (%s), got %s", time.Duration(co.MaxAckDelay), time.Duration(d))
		}
	}
	if co.MaxBuffer < 1 {
		bad("gateway.coalesce.max_buffer", "must be > 0, got %d", co.MaxBuffer)
	}
	if c.ZeroRTT.MaxTicketAge < 0 {
		bad("zero_rtt.max_ticket_age", "must be positive, got %s", time.Duration(c.ZeroRTT.MaxTicketAge))
	}
	if w := time.Duration(c.ZeroRTT.Window); w < 100*time.Millisecond || w > 5*time.Minute {
		bad("zero_rtt.window", "must be 100ms..5m, got %s", w)
	}
	if s := c.ZeroRTT.StrikeRegister; s != "memory" && s != "redis" {
		bad("zero_rtt.strike_register", "want memory or redis, got %q", s)
	}
	c.validateInstances(bad)
	if s := c.ZeroRTT.SessionKeysStore; s != "file" && s != "redis" {
		bad("zero_rtt.session_keys_store", "want file or redis, got %q", s)
	}
	c.validateRedis(bad)
	if r := time.Duration(c.ZeroRTT.TicketKeyRotation); r < time.Second || r > 7*24*time.Hour {
		bad("zero_rtt.ticket_key_rotation", "must be 1s..168h, got %s", r)
	}
	if w := time.Duration(c.TLS.WatchInterval); w < 10*time.Millisecond || w > time.Hour {
		bad("tls.watch_interval", "must be 10ms..1h, got %s", w)
	}
	for i, h := range c.TLS.ACME.Hosts {
		if !strings.Contains(strings.Trim(h, "."), ".") || net.ParseIP(h) != nil {
			bad(fmt.Sprintf("tls.acme.hosts[%d]", i), "want a public DNS name, got %q", h)
		}
	}
	if len(c.TLS.ACME.Hosts) == 0 && (c.TLS.ACME.DirectoryURL != "" || c.TLS.ACME.CAFile != "" || c.TLS.ACME.Email != "") {
		bad("tls.acme.hosts", "must name at least one host when other tls.acme keys are set")
	}
	if g := time.Duration(c.Gateway.ShutdownGrace); g < 0 || g > 10*time.Minute {
		bad("gateway.shutdown_grace", "must be 0..10m, got %s", g)
	}
	routes := gateway.EarlyDataRoutes()
	for _, path := range slices.Sorted(maps.Keys(c.ZeroRTT.Routes)) {
		key := fmt.Sprintf("zero_rtt.routes[%q]", path)
		if !slices.Contains(routes, path) {
			bad(key, "not a route; routes are %s", strings.Join(routes, ", "))
		}
		if _, err := tlsbind.ParseEarlyPolicy(c.ZeroRTT.Routes[path]); err != nil {
			bad(key, "%v", err)
		}
	}
	for i, s := range c.ZeroRTT.TrustedProxies {
		if _, err := parseTrustedProxy(s); err != nil {
			bad(fmt.Sprintf("zero_rtt.trusted_proxies[%d]", i), "%v", err)
		}
	}
	// The gateway's own rules, checked here so that a reload with bad
	// limits is refused before anything of it applies.
	if err := limitsOf(c.RateLimits).Validate(); err != nil {
		errs = append(errs, err)
	}
	if s := c.RateLimits.Store; s != "local" && s != "redis" {
		bad("rate_limits.store", "want \"local\" or \"redis\", got %q", s)
	}
	if r := time.Duration(c.RateLimits.StoreRetry); r < 10*time.Millisecond || r > time.Minute {
		bad("rate_limits.store_retry", "must be 10ms..1m, got %s", r)
	}
	for i, h := range c.AdminHosts {
		if h == "" || strings.ContainsAny(h, ":/[] ") {
			bad(fmt.Sprintf("admin_hosts[%d]", i), "want a host name without port, got %q", h)
		}
	}
	if e := c.Tracing.OTLPEndpoint; e != "" && !strings.HasPrefix(e, "http://") && !strings.HasPrefix(e, "https://") {
		bad("tracing.otlp_endpoint", "want an http:// or https:// URL, got %q", e)
	}
	if c.ModelRepository.Poll < 0 {
		bad("model_repository.poll", "must be > 0, got %s", time.Duration(c.ModelRepository.Poll))
	}
	if c.ModelRepository.DrainTimeout < 0 {
		bad("model_repository.drain_timeout", "must be > 0, got %s", time.Duration(c.ModelRepository.DrainTimeout))
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
	if len(z.Instance) > 255 {
		bad("zero_rtt.instance", "must be at most 255 bytes, got %d", len(z.Instance))
	}
	for i, name := range z.TrustedInstances {
		if name == "" || len(name) > 255 {
			bad(fmt.Sprintf("zero_rtt.trusted_instances[%d]", i), "must be 1..255 bytes, got %q", name)
		}
	}
	if z.StrikeRegister != "memory" || z.Disabled || c.Auth.Disabled {
		return
	}
	if z.Instance != "" {
		bad("zero_rtt.instance", "a fixed name (%q) lets other instances, and this one after a restart, accept its tickets in 0-RTT, which needs one strike register for all: set strike_register \"redis\", or leave instance unset for a name of its own at each start", z.Instance)
	}
	if len(z.TrustedInstances) > 0 {
		bad("zero_rtt.trusted_instances", "trusting %q for 0-RTT needs a strike register they share: set strike_register \"redis\", or leave trusted_instances empty", z.TrustedInstances)
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
