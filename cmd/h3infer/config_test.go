package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"h3infer/gateway"
	"h3infer/internal/redistest"
	"h3infer/workerpool"
)

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestObservabilityConfig(t *testing.T) {
	redisAddr := redistest.StartTCP(t)
	c, err := loadConfig(writeConfig(t, `{
		"admin": "0.0.0.0:9090",
		"admin_token": "tok",
		"tracing": {"otlp_endpoint": "http://127.0.0.1:4318/v1/traces"},
		"rate_limits": {
			"default": {"requests_per_second": 5, "request_burst": 10, "output_tokens_per_second": 200, "max_concurrent": 4, "tokens_per_minute": 6000, "token_burst": 8000},
			"tenants": {"gold": {"requests_per_second": 50}},
			"cut_off": true,
			"store": "redis",
			"redis_addr": "`+redisAddr+`"
		}
	}`))
	if err != nil {
		t.Fatal(err)
	}
	c = c.withDefaults()
	if err := c.validate(); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	if c.RateLimits.RedisPrefix != "h3infer:rl:" {
		t.Errorf("redis_prefix default %q", c.RateLimits.RedisPrefix)
	}
	rl, closeLimits, err := rateLimits(c)
	if err != nil {
		t.Fatal(err)
	}
	defer closeLimits()
	want := gateway.TenantLimit{RequestsPerSecond: 5, RequestBurst: 10, OutputTokensPerSecond: 200, MaxConcurrent: 4, TokensPerMinute: 6000, TokenBurst: 8000}
	if rl.Default != want || rl.Tenants["gold"].RequestsPerSecond != 50 || !rl.CutOff || rl.Store == nil {
		t.Errorf("rate limits = %+v", rl)
	}
}

// checkConfigErrors loads each config file of cases (by name) and checks
// that loading or validating it fails with an error naming the key given.
func checkConfigErrors(t *testing.T, cases map[string]struct{ file, want string }) {
	t.Helper()
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			c, err := loadConfig(writeConfig(t, tc.file))
			if err == nil {
				err = c.withDefaults().validate()
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want one naming %s", err, tc.want)
			}
		})
	}
}

func TestObservabilityConfigErrors(t *testing.T) {
	checkConfigErrors(t, map[string]struct{ file, want string }{
		"admin host with port":     {`{"admin_hosts": ["gw1.internal:9090"]}`, "admin_hosts[0]"},
		"empty admin host":         {`{"admin_hosts": ["gw1", ""]}`, "admin_hosts[1]"},
		"unknown store":            {`{"rate_limits": {"store": "memcached"}}`, "rate_limits.store"},
		"redis without address":    {`{"rate_limits": {"store": "redis"}}`, "rate_limits.redis_addr"},
		"bad redis URL scheme":     {`{"redis": {"url": "http://u:hunter2@h:1"}, "rate_limits": {"store": "redis"}}`, "redis.url"},
		"bad redis URL db":         {`{"redis": {"url": "redis://u:hunter2@h:1/x"}, "zero_rtt": {"strike_register": "redis"}}`, "redis.url"},
		"bad zero_rtt address":     {`{"zero_rtt": {"session_keys_store": "redis", "redis_addr": "nohost"}}`, "zero_rtt.redis_addr"},
		"strikes without address":  {`{"zero_rtt": {"strike_register": "redis"}}`, "zero_rtt.redis_addr"},
		"CA without TLS":           {`{"redis": {"url": "redis://h:1", "ca_file": "/etc/hosts"}, "rate_limits": {"store": "redis"}}`, "redis.ca_file"},
		"store_retry too short":    {`{"rate_limits": {"store_retry": "1ms"}}`, "rate_limits.store_retry"},
		"negative tokens/minute":   {`{"rate_limits": {"default": {"tokens_per_minute": -1}}}`, "rate_limits.default.tokens_per_minute"},
		"negative token burst":     {`{"rate_limits": {"tenants": {"gold": {"token_burst": -5}}}}`, "rate_limits.tenants.gold.token_burst"},
		"upstream over plain http": {`{"upstreams": [{"name": "r", "url": "http://regional.example:8000"}]}`, "upstreams[0].url"},
		"upstream priority":        {`{"upstreams": [{"name": "r", "url": "https://r:1", "priority": "urgent-first"}]}`, "upstreams[0].priority"},
		"upstream named twice":     {`{"upstreams": [{"name": "r", "url": "https://a:1"}, {"name": "r", "url": "https://b:1"}]}`, "upstreams[1].name"},
		"upstream unknown key":     {`{"upstreams": [{"name": "r", "url": "https://r:1", "api_key": "x"}]}`, "api_key"},
		"endpoint not a URL":       {`{"tracing": {"otlp_endpoint": "127.0.0.1:4318"}}`, "tracing.otlp_endpoint"},
		"unknown admission":        {`{"scheduler": {"admission": "lifo"}}`, "scheduler.admission"},
		"lifo without delay":       {`{"scheduler": {"admission": "count", "lifo": true}}`, "scheduler.lifo"},
		"negative queue delay":     {`{"scheduler": {"max_queue_delay": "-1s"}}`, "scheduler.max_queue_delay"},
	})
	// Unknown keys are errors, here as everywhere in the file.
	if _, err := loadConfig(writeConfig(t, `{"rate_limits": {"default": {"rps": 1}}}`)); err == nil {
		t.Error("unknown key rate_limits.default.rps accepted")
	}
}

func TestUrgencyConfig(t *testing.T) {
	tests := map[string]struct {
		json     string
		want     []string // keys the errors must name; none: valid
		wantLoad bool     // the file itself must be refused
	}{
		"defaults": {json: `{}`},
		"tenants": {json: `{"scheduler": {"tenants": [
			{"name": "interactive", "weight": 3, "default_urgency": 1},
			{"name": "batch", "default_urgency": 6, "urgency_ceiling": 4, "max_queue": 32}]}}`},
		"bad tenants": {
			json: `{"scheduler": {"tenants": [{"weight": -1}, {"name": "x", "default_urgency": 8}, {"name": "x", "default_urgency": 2, "urgency_ceiling": 3, "max_queue": -1}]}}`,
			want: []string{"scheduler.tenants[0].name", "scheduler.tenants[0].weight", "scheduler.tenants[1].default_urgency", "scheduler.tenants[2].name", "scheduler.tenants[2].urgency_ceiling", "scheduler.tenants[2].max_queue"},
		},
		"windows beyond the ack delay": {
			json: `{"gateway": {"coalesce": {"window": "30ms", "bulk_window": "40ms"}}}`,
			want: []string{"gateway.coalesce.window", "gateway.coalesce.bulk_window"},
		},
		"deadline beyond its ceiling":      {json: `{"gateway": {"deadline": "10m"}}`, want: []string{"gateway.deadline"}},
		"reserve takes every slot":         {json: `{"workers": {"slots": 2}, "scheduler": {"urgent_reserve": 2}}`, want: []string{"scheduler.urgent_reserve"}},
		"single slot, default reserve":     {json: `{"workers": {"slots": 1}}`},
		"reserve within derived slots":     {json: `{"scheduler": {"urgent_reserve": 3}}`},
		"reserve past derived slots":       {json: `{"scheduler": {"urgent_reserve": 4}}`, want: []string{"scheduler.urgent_reserve"}},
		"negative slots":                   {json: `{"workers": {"slots": -1}}`, want: []string{"workers.slots"}},
		"reserve and nice off":             {json: `{"workers": {"nice": 0}, "scheduler": {"urgent_reserve": 0}}`},
		"nice out of range":                {json: `{"workers": {"nice": 20}}`, want: []string{"workers.nice"}},
		"negative nice":                    {json: `{"workers": {"nice": -1}}`, want: []string{"workers.nice"}},
		"negative memory limit":            {json: `{"model_repository": {"memory_limit_bytes": -1}}`, want: []string{"model_repository.memory_limit_bytes"}},
		"bulk_min not above urgent":        {json: `{"priority": {"urgent_max": 4, "bulk_min": 3}}`, want: []string{"priority.bulk_min"}},
		"bulk_min left at its default":     {json: `{"priority": {"urgent_max": 6}}`, want: []string{"priority.bulk_min"}},
		"urgent_max 0 is taken as written": {json: `{"priority": {"urgent_max": 0}}`},
		"the old coalescer key is gone":    {json: `{"gateway": {"coalesce": {"urgent_max": 2}}}`, wantLoad: true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "c.json")
			if err := os.WriteFile(path, []byte(tc.json), 0o600); err != nil {
				t.Fatal(err)
			}
			c, err := loadConfig(path)
			if tc.wantLoad {
				if err == nil {
					t.Fatal("file with an unknown key accepted")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			err = c.withDefaults().validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("valid config refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("invalid config accepted")
			}
			for _, key := range tc.want {
				if !strings.Contains(err.Error(), key+":") {
					t.Errorf("error does not name %s:\n%v", key, err)
				}
			}
		})
	}
}

func TestProviderConfig(t *testing.T) {
	model := t.TempDir()
	if err := os.WriteFile(filepath.Join(model, "model.onnx"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := map[string]struct {
		json    string
		want    []string // keys the errors must name; none: valid
		workers int      // the default worker count it gets, when valid
	}{
		"cpu":           {json: `{"models": [{"name": "a", "dir": %q}]}`, workers: workerpool.AutoWorkers(runtime.NumCPU(), 1, false)},
		"cuda":          {json: `{"models": [{"name": "a", "dir": %q, "provider": "cuda", "device_id": 1, "device_kv": false}], "workers": {"gpu_memory_bytes": 8589934592}}`, workers: 1},
		"auto":          {json: `{"models": [{"name": "a", "dir": %q, "provider": "auto"}]}`, workers: 1},
		"tensorrt":      {json: `{"models": [{"name": "a", "dir": %q, "provider": "tensorrt"}]}`, workers: 1},
		"count stays":   {json: `{"models": [{"name": "a", "dir": %q, "provider": "cuda"}], "workers": {"count": 3}}`, workers: 3},
		"bad provider":  {json: `{"models": [{"name": "a", "dir": %q, "provider": "rocm", "device_id": -1}], "workers": {"gpu_memory_bytes": -1}}`, want: []string{"models[0].provider", "models[0].device_id", "workers.gpu_memory_bytes"}},
		"device on cpu": {json: `{"models": [{"name": "a", "dir": %q, "device_id": 2}]}`, want: []string{"models[0].device_id"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "c.json")
			if err := os.WriteFile(path, []byte(fmt.Sprintf(tc.json, model)), 0o600); err != nil {
				t.Fatal(err)
			}
			c, err := loadConfig(path)
			if err != nil {
				t.Fatal(err)
			}
			c = c.withDefaults()
			err = c.validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("valid config refused: %v", err)
				}
				if c.Workers.Count != tc.workers {
					t.Errorf("workers.count: got %d, want %d", c.Workers.Count, tc.workers)
				}
				return
			}
			if err == nil {
				t.Fatal("invalid config accepted")
			}
			for _, key := range tc.want {
				if !strings.Contains(err.Error(), key+":") {
					t.Errorf("error does not name %s:\n%v", key, err)
				}
			}
		})
	}
}

// An urgent slot and lower-priority bulk work are on unless turned off;
// a single-slot worker has no slot to reserve.
func TestUrgencyDefaults(t *testing.T) {
	for name, tc := range map[string]struct {
		json          string
		reserve, nice int
	}{
		"defaults":    {json: `{}`, reserve: 1, nice: defaultWorkerNice},
		"single slot": {json: `{"workers": {"slots": 1}}`, reserve: 0, nice: defaultWorkerNice},
		"off":         {json: `{"workers": {"nice": 0}, "scheduler": {"urgent_reserve": 0}}`, reserve: 0, nice: 0},
		"set":         {json: `{"workers": {"nice": 3}, "scheduler": {"urgent_reserve": 2}}`, reserve: 2, nice: 3},
	} {
		t.Run(name, func(t *testing.T) {
			c, err := loadConfig(writeConfig(t, tc.json))
			if err != nil {
				t.Fatal(err)
			}
			c = c.withDefaults()
			if err := c.validate(); err != nil {
				t.Fatal(err)
			}
			if got := *c.Scheduler.UrgentReserve; got != tc.reserve {
				t.Errorf("scheduler.urgent_reserve = %d, want %d", got, tc.reserve)
			}
			if got := *c.Workers.Nice; got != tc.nice {
				t.Errorf("workers.nice = %d, want %d", got, tc.nice)
			}
		})
	}
}

// The gateway's garbage-collection settings default to gc_percent 400 and
// no memory limit, and out-of-range values name their key.
func TestGCConfig(t *testing.T) {
	c, err := loadConfig(writeConfig(t, `{}`))
	if err != nil {
		t.Fatal(err)
	}
	if c = c.withDefaults(); c.Gateway.GCPercent != 400 || c.Gateway.MemoryLimitBytes != 0 {
		t.Errorf("defaults gc_percent %d, memory_limit_bytes %d; want 400 and 0", c.Gateway.GCPercent, c.Gateway.MemoryLimitBytes)
	}
	checkConfigErrors(t, map[string]struct{ file, want string }{
		"gc too low":     {`{"gateway": {"gc_percent": 10}}`, "gateway.gc_percent"},
		"negative limit": {`{"gateway": {"memory_limit_bytes": -1}}`, "gateway.memory_limit_bytes"},
	})
}

// TestRedisErrorsHidePassword: a Redis URL carries a password, and neither
// a config error nor a connection error may show it.
func TestRedisErrorsHidePassword(t *testing.T) {
	for _, url := range []string{
		"redis://gw:hunter2@127.0.0.1:notaport/0",
		"redis://gw:hunter2@127.0.0.1:6379/x",
		"rediss://gw:hunter2@[::1/0",
		"redis://gw:hunter2@127.0.0.1:6379/0?bogus=1",
		"redis://gw:hunter2@127.0.0.1:1/0", // valid; nothing listens
	} {
		c := Config{Redis: RedisConfig{URL: url}, RateLimits: RateLimitsConfig{Store: "redis"}}.withDefaults()
		err := c.validate()
		if err == nil {
			_, err = openRedis(c, "rate_limits")
		}
		if err == nil {
			t.Errorf("%s: no error", url)
		} else if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("error shows the password: %v", err)
		} else if !strings.Contains(err.Error(), "redis.url") {
			t.Errorf("error names no key: %v", err)
		}
	}
}

// TestInstanceNamesNeedSharedStrikeRegister: a configuration in which several
// processes would accept each other's tickets in 0-RTT while each keeps
// its own strike register is refused, naming the key; the same names with
// the shared register, and the defaults, are accepted.
func TestInstanceNamesNeedSharedStrikeRegister(t *testing.T) {
	checkConfigErrors(t, map[string]struct{ file, want string }{
		"fixed name, memory register":  {`{"zero_rtt": {"instance": "edge"}}`, "zero_rtt.instance:"},
		"trusted peers, memory":        {`{"zero_rtt": {"instance": "a", "trusted_instances": ["b"], "strike_register": "memory"}}`, "zero_rtt.trusted_instances:"},
		"trusted peers without a name": {`{"zero_rtt": {"trusted_instances": ["b"]}}`, "zero_rtt.trusted_instances:"},
		"empty trusted name":           {`{"zero_rtt": {"trusted_instances": [""], "strike_register": "redis", "redis_addr": "127.0.0.1:6379"}}`, "zero_rtt.trusted_instances[0]:"},
		"name too long":                {`{"zero_rtt": {"instance": "` + strings.Repeat("x", 256) + `", "strike_register": "redis", "redis_addr": "127.0.0.1:6379"}}`, "zero_rtt.instance:"},
	})
	for name, file := range map[string]string{
		"defaults":                  `{}`,
		"shared register":           `{"zero_rtt": {"instance": "a", "trusted_instances": ["b"], "strike_register": "redis", "redis_addr": "127.0.0.1:6379"}}`,
		"one name, shared register": `{"zero_rtt": {"instance": "edge", "strike_register": "redis", "redis_addr": "127.0.0.1:6379"}}`,
		"0-RTT off":                 `{"zero_rtt": {"disabled": true, "instance": "edge"}}`,
	} {
		c, err := loadConfig(writeConfig(t, file))
		if err == nil {
			err = c.withDefaults().validate()
		}
		if err != nil {
			t.Errorf("%s: refused: %v", name, err)
		}
	}
}

func TestConnectionLimitConfig(t *testing.T) {
	c, err := loadConfig(writeConfig(t, `{"gateway": {"max_streams": 50}}`))
	if err != nil {
		t.Fatal(err)
	}
	c = c.withDefaults()
	g := c.Gateway
	if g.PreauthStreams != 50 || time.Duration(g.HeaderTimeout) != 10*time.Second ||
		g.MaxConnections != gateway.DefaultMaxConnections() || g.MaxConnectionsPerSource != 64 ||
		g.MaxIdleConnections != gateway.DefaultMaxConnections()*3/4 {
		t.Errorf("defaults preauth_streams %d, header_timeout %s, max_connections %d, max_connections_per_source %d, max_idle_connections %d; want 50 (max_streams), 10s, %d, 64, %d",
			g.PreauthStreams, time.Duration(g.HeaderTimeout), g.MaxConnections, g.MaxConnectionsPerSource, g.MaxIdleConnections,
			gateway.DefaultMaxConnections(), gateway.DefaultMaxConnections()*3/4)
	}
	checkConfigErrors(t, map[string]struct{ file, want string }{
		"preauth over max_streams": {`{"gateway": {"max_streams": 10, "preauth_streams": 11}}`, "gateway.preauth_streams"},
		"negative header timeout":  {`{"gateway": {"header_timeout": "-1s"}}`, "gateway.header_timeout"},
		"negative auth timeout":    {`{"gateway": {"auth_timeout": "-1s"}}`, "gateway.auth_timeout"},
		"negative connections":     {`{"gateway": {"max_connections": -1}}`, "gateway.max_connections"},
		"per source over total":    {`{"gateway": {"max_connections": 10, "max_connections_per_source": 11}}`, "gateway.max_connections_per_source"},
		"idle over total":          {`{"gateway": {"max_connections": 10, "max_idle_connections": 11}}`, "gateway.max_idle_connections"},
		"negative idle":            {`{"gateway": {"max_idle_connections": -1}}`, "gateway.max_idle_connections"},
	})
}

func TestZeroRTTConfigErrors(t *testing.T) {
	checkConfigErrors(t, map[string]struct{ file, want string }{
		"route that is not one": {`{"zero_rtt": {"routes": {"/v1/chat/completion": "serve"}}}`,
			`zero_rtt.routes["/v1/chat/completion"]: not a route; routes are /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /v1/models/, /tokenize, /detokenize`},
		"unknown policy":         {`{"zero_rtt": {"routes": {"/v1/models": "sometimes"}}}`, `zero_rtt.routes["/v1/models"]: want serve`},
		"proxy not an address":   {`{"zero_rtt": {"trusted_proxies": ["10.0.0.0/8", "proxy.internal"]}}`, "zero_rtt.trusted_proxies[1]"},
		"proxy prefix host bits": {`{"zero_rtt": {"trusted_proxies": ["10.0.0.1/8"]}}`, "zero_rtt.trusted_proxies[0]: \"10.0.0.1/8\" has host bits set; write 10.0.0.0/8"},
		"proxy prefix too long":  {`{"zero_rtt": {"trusted_proxies": ["10.0.0.0/33"]}}`, "zero_rtt.trusted_proxies[0]"},
		"proxy IPv4-mapped":      {`{"zero_rtt": {"trusted_proxies": ["::ffff:10.0.0.1"]}}`, "zero_rtt.trusted_proxies[0]"},
		"proxy with a zone":      {`{"zero_rtt": {"trusted_proxies": ["fe80::1%eth0"]}}`, "zero_rtt.trusted_proxies[0]"},
		"proxies not a list":     {`{"zero_rtt": {"trusted_proxies": "10.0.0.0/8"}}`, "trusted_proxies"},
	})
	good := `{"zero_rtt": {"routes": {"/v1/chat/completions": "serve", "/v1/models/": "reject"}, "trusted_proxies": ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1"]}}`
	c, err := loadConfig(writeConfig(t, good))
	if err == nil {
		err = c.withDefaults().validate()
	}
	if err != nil {
		t.Errorf("valid zero_rtt config refused: %v", err)
	}
}

// TestChangedKeys: a reload names the keys that changed, those of the
// part of a section a library owns included, and no others.
func TestChangedKeys(t *testing.T) {
	load := func(text string) Config {
		t.Helper()
		c, err := loadConfig(writeConfig(t, text))
		if err != nil {
			t.Fatal(err)
		}
		return c.withDefaults()
	}
	a := load(`{}`)
	b := load(`{"listen": "127.0.0.1:1", "scheduler": {"max_queue": 3}, "gateway": {"max_streams": 500, "gc_percent": 100, "coalesce": {"window": "5ms"}},
		"rate_limits": {"store_retry": "2s", "redis_prefix": "x:"}}`)
	got := changedKeys(a, b)
	slices.Sort(got)
	want := []string{"gateway.coalesce", "gateway.gc_percent", "gateway.max_streams", "listen", "rate_limits.redis_prefix", "rate_limits.store_retry", "scheduler.max_queue"}
	if !slices.Equal(got, want) {
		t.Errorf("changed keys %q, want %q", got, want)
	}
	if got := changedKeys(a, load(`{}`)); len(got) != 0 {
		t.Errorf("the same file read twice: changed keys %q", got)
	}
}

// The prepacked weights cache is on by default, under the state dir, and
// reaches the workers' settings; disabled, the workers get no directory.
func TestWeightsCacheConfig(t *testing.T) {
	for name, tc := range map[string]struct {
		json, want string
	}{
		"default":  {json: `{"state_dir": "/srv/h3infer"}`, want: "/srv/h3infer/cache/weights"},
		"set":      {json: `{"workers": {"weights_cache_dir": "/var/cache/h3infer"}}`, want: "/var/cache/h3infer"},
		"disabled": {json: `{"workers": {"weights_cache_disabled": true}}`, want: ""},
	} {
		t.Run(name, func(t *testing.T) {
			c, err := loadConfig(writeConfig(t, tc.json))
			if err != nil {
				t.Fatal(err)
			}
			c = c.withDefaults()
			if err := c.validate(); err != nil {
				t.Fatal(err)
			}
			if got := c.pool().Worker.WeightsCacheDir; got != tc.want {
				t.Errorf("workers' weights cache %q, want %q", got, tc.want)
			}
			if again := c.withDefaults().pool().Worker.WeightsCacheDir; again != tc.want {
				t.Errorf("defaults applied twice: workers' weights cache %q, want %q", again, tc.want)
			}
		})
	}
}
