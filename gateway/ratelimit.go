package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"h3infer/config"
	"h3infer/ratelimit"
	"h3infer/scheduler"
)

// LimitStore keeps the token buckets behind rate limits: ratelimit.Local for
// one instance, ratelimit.Redis for limits shared by several.
type LimitStore interface {
	Take(ctx context.Context, key string, lim ratelimit.Limit, cost int, force bool) (ratelimit.Decision, error)
}

// TenantLimit is one tenant's limits, as the configuration file writes
// them. A zero field means no limit of that kind.
type TenantLimit struct {
	// RequestsPerSecond admits completion requests at this rate, with bursts
	// of RequestBurst (default: the rate rounded up).
	RequestsPerSecond float64 `json:"requests_per_second"`
	RequestBurst      int     `json:"request_burst"`
	// OutputTokensPerSecond debits generated tokens as they stream, with
	// bursts of OutputTokenBurst (default: the rate rounded up). A stream
	// that runs over is paced, or cut off when RateLimits.CutOff is set.
	OutputTokensPerSecond float64 `json:"output_tokens_per_second"`
	OutputTokenBurst      int     `json:"output_token_burst"`
	// MaxConcurrent caps the tenant's completions running at once on this
	// instance.
	MaxConcurrent int `json:"max_concurrent"`
}

func (l TenantLimit) any() bool {
	return l.RequestsPerSecond > 0 || l.OutputTokensPerSecond > 0 || l.MaxConcurrent > 0
}

// RateLimits configures per-tenant limits. The zero value limits nothing.
// The fields with json tags are written as in the configuration file's
// rate_limits section; which store keeps the buckets is the wiring's.
type RateLimits struct {
	// Default applies to every tenant not listed in Tenants.
	Default TenantLimit `json:"default"`
	// Tenants overrides Default per tenant name (as Config.Tenant names
	// them). The names listed here are also the only tenant label values
	// metrics use besides scheduler.DefaultTenant.
	Tenants map[string]TenantLimit `json:"tenants"`
	// CutOff ends a stream that runs over its output-token rate with a
	// rate_limit_exceeded error instead of pacing it.
	CutOff bool `json:"cut_off"`
	// Store keeps the buckets. Default: a ratelimit.Local of the gateway's
	// own. When a Store other than a ratelimit.Local fails, the gateway
	// decides with a local store of its own under the same limits (per
	// instance, then) rather than admit everything, and tries Store again
	// after StoreRetry.
	Store LimitStore `json:"-"`
	// StoreRetry is how long the local fallback decides after Store
	// failed. 10ms..1m; default 1s.
	StoreRetry config.Duration `json:"store_retry"`
}

// DefaultStoreRetry is RateLimits.StoreRetry's default.
const DefaultStoreRetry = time.Second

// Bounds of RateLimits.StoreRetry: shorter, a store that is down is
// called for nearly every request anyway; longer, a store that is back
// leaves each instance deciding alone for minutes.
const (
	minStoreRetry = 10 * time.Millisecond
	maxStoreRetry = time.Minute
)

// WithDefaults returns rl with every zero value replaced by its default.
func (rl RateLimits) WithDefaults() RateLimits {
	if rl.StoreRetry == 0 {
		rl.StoreRetry = config.Duration(DefaultStoreRetry)
	}
	return rl
}

// The limit label values of h3infer_rate_limit_refusals_total.
const (
	limitRequests    = "requests"
	limitTokens      = "tokens"
	limitConcurrency = "concurrency"
)

// rateLimited is a request refused, or a stream cut off, by a limit.
type rateLimited struct {
	tenant     string
	limit      string // "requests", "tokens" or "concurrency"
	retryAfter time.Duration
	policy     string // RateLimit-Policy value, "" when none applies
	state      string // RateLimit value
}

func (e *rateLimited) Error() string {
	return fmt.Sprintf("tenant %s: %s rate limit exceeded", e.tenant, e.limit)
}

// Validate reports every problem with rl, each naming its config key, so
// that a configuration can be checked before it is applied.
func (rl RateLimits) Validate() error { return validateRateLimits(rl) }

func validateRateLimits(rl RateLimits) error {
	var errs []error
	check := func(key string, l TenantLimit) {
		if l.RequestsPerSecond < 0 || math.IsNaN(l.RequestsPerSecond) || math.IsInf(l.RequestsPerSecond, 0) {
			errs = append(errs, fmt.Errorf("%s.requests_per_second: must be a finite number >= 0, got %v", key, l.RequestsPerSecond))
		}
		if l.RequestBurst < 0 {
			errs = append(errs, fmt.Errorf("%s.request_burst: must be >= 0, got %d", key, l.RequestBurst))
		}
		if l.OutputTokensPerSecond < 0 || math.IsNaN(l.OutputTokensPerSecond) || math.IsInf(l.OutputTokensPerSecond, 0) {
			errs = append(errs, fmt.Errorf("%s.output_tokens_per_second: must be a finite number >= 0, got %v", key, l.OutputTokensPerSecond))
		}
		if l.OutputTokenBurst < 0 {
			errs = append(errs, fmt.Errorf("%s.output_token_burst: must be >= 0, got %d", key, l.OutputTokenBurst))
		}
		if l.MaxConcurrent < 0 {
			errs = append(errs, fmt.Errorf("%s.max_concurrent: must be >= 0, got %d", key, l.MaxConcurrent))
		}
	}
	if r := time.Duration(rl.WithDefaults().StoreRetry); r < minStoreRetry || r > maxStoreRetry {
		errs = append(errs, fmt.Errorf("rate_limits.store_retry: must be 10ms..1m, got %s", r))
	}
	check("rate_limits.default", rl.Default)
	for name, l := range rl.Tenants {
		if name == "" {
			errs = append(errs, errors.New("rate_limits.tenants: a tenant name must not be empty"))
		}
		check("rate_limits.tenants."+name, l)
	}
	return errors.Join(errs...)
}

// limiter applies one RateLimits. It is immutable once built except for the
// counts it shares: SetRateLimits swaps in a new limiter, and a request
// keeps the one it was admitted by until it ends. Concurrency is counted in
// this process; the rate buckets live in the store.
type limiter struct {
	cfg     RateLimits
	store   LimitStore
	running *running
	// fallback decides while store fails; nil when store is local.
	fallback *storeFallback
}

// storeFallback stands in for a shared limit store that fails: a local
// store with the same limits, so that the limits still hold on each
// instance (a tenant may get up to one budget per instance meanwhile)
// instead of vanishing. After a failure the shared store is left alone for
// retry, so that a store that is down costs one failed call per retry
// rather than one per request.
type storeFallback struct {
	local     *ratelimit.Local
	retry     time.Duration
	errors    prometheus.Counter
	decisions *prometheus.CounterVec // by result: admitted, refused
	log       *slog.Logger

	mu      sync.Mutex
	failing bool
	nextTry time.Time
}

func newStoreFallback(retry time.Duration, m *metrics, log *slog.Logger) *storeFallback {
	if retry <= 0 {
		retry = DefaultStoreRetry
	}
	return &storeFallback{local: ratelimit.NewLocal(), retry: retry, errors: m.limitStoreErrors, decisions: m.limitFallback, log: log}
}

// take asks store, or the local store while store is failing.
func (f *storeFallback) take(ctx context.Context, store LimitStore, key string, lim ratelimit.Limit, cost int, force bool) (ratelimit.Decision, error) {
	f.mu.Lock()
	skip := f.failing && time.Now().Before(f.nextTry)
	f.mu.Unlock()
	if !skip {
		d, err := store.Take(ctx, key, lim, cost, force)
		if err == nil {
			f.mu.Lock()
			if f.failing {
				f.failing = false
				f.log.Info("rate limit store is back; limits are shared again")
			}
			f.mu.Unlock()
			return d, nil
		}
		if ctx.Err() != nil {
			// The request went away; that says nothing of the store.
			return d, err
		}
		f.errors.Inc()
		f.mu.Lock()
		if !f.failing {
			f.log.Warn("rate limit store failed; each instance applies the limits alone until it is back", "err", err, "retry", f.retry)
		}
		f.failing = true
		f.nextTry = time.Now().Add(f.retry)
		f.mu.Unlock()
	}
	d, err := f.local.Take(ctx, key, lim, cost, force)
	if err != nil {
		return d, err
	}
	result := "refused"
	if d.OK {
		result = "admitted"
	}
	f.decisions.WithLabelValues(result).Inc()
	return d, nil
}

// running counts each tenant's completions in progress. The limiters a
// reload swaps share one, so that a new max_concurrent counts the requests
// the old limits admitted.
type running struct {
	mu sync.Mutex
	n  map[string]int // tenant → completions running
}

// newLimiter builds the limiter for cfg. prev, when not nil, is the limiter
// it replaces: its concurrency counts carry over, and so do its store and
// fallback when cfg names no store, so that the buckets keep what they
// hold.
func newLimiter(cfg RateLimits, prev *limiter, m *metrics, log *slog.Logger) *limiter {
	withBurst := func(l TenantLimit) TenantLimit {
		if l.RequestBurst == 0 {
			l.RequestBurst = int(math.Ceil(l.RequestsPerSecond))
		}
		if l.OutputTokenBurst == 0 {
			l.OutputTokenBurst = int(math.Ceil(l.OutputTokensPerSecond))
		}
		return l
	}
	cfg.Default = withBurst(cfg.Default)
	tenants := make(map[string]TenantLimit, len(cfg.Tenants))
	for k, v := range cfg.Tenants {
		tenants[k] = withBurst(v)
	}
	cfg.Tenants = tenants
	l := &limiter{cfg: cfg, store: cfg.Store, running: &running{n: map[string]int{}}}
	if prev != nil {
		l.running = prev.running
		if l.store == nil {
			l.store, l.fallback = prev.store, prev.fallback
			return l
		}
	}
	if l.store == nil {
		l.store = ratelimit.NewLocal()
	}
	if _, local := l.store.(*ratelimit.Local); !local {
		l.fallback = newStoreFallback(time.Duration(cfg.StoreRetry), m, log)
	}
	return l
}

// take debits the store, or the fallback while the store fails.
func (l *limiter) take(ctx context.Context, key string, lim ratelimit.Limit, cost int, force bool) (ratelimit.Decision, error) {
	if l.fallback == nil {
		return l.store.Take(ctx, key, lim, cost, force)
	}
	return l.fallback.take(ctx, l.store, key, lim, cost, force)
}

func (l *limiter) limitOf(tenant string) TenantLimit {
	if t, ok := l.cfg.Tenants[tenant]; ok {
		return t
	}
	return l.cfg.Default
}

// tenantLabel bounds the metric label to the configured tenants.
func (l *limiter) tenantLabel(tenant string) string {
	if _, ok := l.cfg.Tenants[tenant]; ok || tenant == scheduler.DefaultTenant {
		return tenant
	}
	return "other"
}

// admission is one admitted request's hold on its tenant's limits.
type admission struct {
	l      *limiter
	tenant string
	limit  TenantLimit
	held   bool // holds a concurrency slot
	tokKey string
}

// admit checks the concurrency cap and the request rate. On success it sets
// the RateLimit headers of the request policy on h and the caller must call
// release when the request ends.
func (l *limiter) admit(ctx context.Context, tenant string, h http.Header) (*admission, error) {
	lim := l.limitOf(tenant)
	a := &admission{l: l, tenant: tenant, limit: lim}
	if !lim.any() {
		return a, nil
	}
	if lim.MaxConcurrent > 0 {
		r := l.running
		r.mu.Lock()
		if r.n[tenant] >= lim.MaxConcurrent {
			r.mu.Unlock()
			return nil, &rateLimited{tenant: tenant, limit: limitConcurrency, retryAfter: time.Second}
		}
		r.n[tenant]++
		a.held = true
		r.mu.Unlock()
	}
	if lim.RequestsPerSecond > 0 {
		bucket := ratelimit.Limit{Rate: lim.RequestsPerSecond, Burst: lim.RequestBurst}
		d, err := l.take(ctx, "req:"+tenant, bucket, 1, false)
		if err != nil {
			// Only a request whose context ended gets here (the
			// fallback answers when the store fails): admit, and let
			// the caller log.
			return a, fmt.Errorf("rate limit store: %w", err)
		}
		policy := fmt.Sprintf(`"requests";q=%d;w=%d`, lim.RequestBurst, ceilSeconds(secondsFor(lim.RequestBurst, lim.RequestsPerSecond)))
		state := fmt.Sprintf(`"requests";r=%d;t=%d`, d.Remaining, ceilSeconds(d.Reset))
		if !d.OK {
			a.release()
			return nil, &rateLimited{tenant: tenant, limit: limitRequests, retryAfter: d.Wait, policy: policy, state: state}
		}
		h.Set("RateLimit-Policy", policy)
		h.Set("RateLimit", state)
	}
	return a, nil
}

func (a *admission) release() {
	if !a.held {
		return
	}
	a.held = false
	r := a.l.running
	r.mu.Lock()
	defer r.mu.Unlock()
	if n := r.n[a.tenant] - 1; n > 0 {
		r.n[a.tenant] = n
	} else {
		delete(r.n, a.tenant)
	}
}

// debitTokens charges n generated tokens to the tenant. Pacing, it returns
// how long the stream must wait out its debt (the caller waits, so that a
// coalescing stream keeps flushing meanwhile); cutting off, it returns a
// *rateLimited once the tenant is over its rate.
func (a *admission) debitTokens(ctx context.Context, n int) (time.Duration, error) {
	if a.limit.OutputTokensPerSecond <= 0 || n <= 0 {
		return 0, nil
	}
	bucket := ratelimit.Limit{Rate: a.limit.OutputTokensPerSecond, Burst: a.limit.OutputTokenBurst}
	if a.tokKey == "" {
		a.tokKey = "tok:" + a.tenant // built once per request, not per token
	}
	d, err := a.l.take(ctx, a.tokKey, bucket, n, !a.l.cfg.CutOff)
	if err != nil {
		return 0, fmt.Errorf("rate limit store: %w", err)
	}
	if !d.OK {
		return 0, &rateLimited{tenant: a.tenant, limit: limitTokens, retryAfter: d.Wait}
	}
	return d.Wait, nil
}

func secondsFor(units int, rate float64) time.Duration {
	return time.Duration(float64(units) / rate * float64(time.Second))
}

func ceilSeconds(d time.Duration) int {
	return int(math.Ceil(d.Seconds()))
}

// rateLimitHeaders is used by writeError for refusals.
func rateLimitHeaders(h http.Header, e *rateLimited) {
	if e.policy != "" {
		h.Set("RateLimit-Policy", e.policy)
		h.Set("RateLimit", e.state)
	}
}
