package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"strings"
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
	// Refund gives n units back to key's bucket, never filling it past
	// lim.Burst.
	Refund(ctx context.Context, key string, lim ratelimit.Limit, n int) error
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
	// TokensPerMinute reserves each request's max_tokens at admission from
	// a bucket that refills at TokensPerMinute/60 a second, up to
	// TokenBurst (default: one minute's worth, rounded up). A request the
	// bucket cannot cover is refused; the end of a request gives back what
	// it did not generate. Unlike OutputTokensPerSecond, this holds the
	// tenant to its budget before any work starts, however many requests
	// arrive at once.
	TokensPerMinute float64 `json:"tokens_per_minute"`
	TokenBurst      int     `json:"token_burst"`
}

func (l TenantLimit) any() bool {
	return l.RequestsPerSecond > 0 || l.OutputTokensPerSecond > 0 || l.MaxConcurrent > 0 || l.TokensPerMinute > 0
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
	limitRequests        = "requests"
	limitTokens          = "tokens"
	limitConcurrency     = "concurrency"
	limitTokensPerMinute = "tokens_per_minute"
)

// rateLimited is a request refused, or a stream cut off, by a limit.
type rateLimited struct {
	tenant     string
	limit      string // one of the limit label values above
	retryAfter time.Duration
	policy     string // RateLimit-Policy value, "" when none applies
	state      string // RateLimit value
}

func (e *rateLimited) Error() string {
	return fmt.Sprintf("tenant %s: %s rate limit exceeded", e.tenant, e.limit)
}

// overBurst is a request that reserves more tokens than its tenant's
// token_burst: no bucket could ever cover it, so waiting never helps and a
// 429 would mislead.
type overBurst struct {
	tenant string
	tokens int // the reservation asked for
	burst  int
}

func (e *overBurst) Error() string {
	return fmt.Sprintf("tenant %s: %d tokens exceed the token burst of %d", e.tenant, e.tokens, e.burst)
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
		if l.TokensPerMinute < 0 || math.IsNaN(l.TokensPerMinute) || math.IsInf(l.TokensPerMinute, 0) {
			errs = append(errs, fmt.Errorf("%s.tokens_per_minute: must be a finite number >= 0, got %v", key, l.TokensPerMinute))
		}
		if l.TokenBurst < 0 {
			errs = append(errs, fmt.Errorf("%s.token_burst: must be >= 0, got %d", key, l.TokenBurst))
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
	log      *slog.Logger
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

// take asks store, or the local store while store is failing. by is the
// store that decided: units taken go back there.
func (f *storeFallback) take(ctx context.Context, store LimitStore, key string, lim ratelimit.Limit, cost int, force bool) (d ratelimit.Decision, by LimitStore, err error) {
	if !f.skipping() {
		d, err := store.Take(ctx, key, lim, cost, force)
		if err == nil {
			f.answered()
			return d, store, nil
		}
		if ctx.Err() != nil {
			// The request went away; that says nothing of the store.
			return d, store, err
		}
		f.failed(err)
	}
	d, err = f.local.Take(ctx, key, lim, cost, force)
	if err != nil {
		return d, f.local, err
	}
	result := "refused"
	if d.OK {
		result = "admitted"
	}
	f.decisions.WithLabelValues(result).Inc()
	return d, f.local, nil
}

// errStoreSkipped is a refund dropped because the shared store failed
// lately. The local store cannot take it instead: it never lent the units.
var errStoreSkipped = errors.New("rate limit store failing; not tried until store_retry has passed")

// refund gives n units back to store, which took them.
func (f *storeFallback) refund(ctx context.Context, store LimitStore, key string, lim ratelimit.Limit, n int) error {
	if f.skipping() {
		return errStoreSkipped
	}
	if err := store.Refund(ctx, key, lim, n); err != nil {
		f.failed(err)
		return err
	}
	f.answered()
	return nil
}

// skipping reports whether the store failed less than retry ago.
func (f *storeFallback) skipping() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.failing && time.Now().Before(f.nextTry)
}

// answered notes that the store answered.
func (f *storeFallback) answered() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failing {
		f.failing = false
		f.log.Info("rate limit store is back; limits are shared again")
	}
}

// failed notes that the store failed with err: it is left alone for retry.
func (f *storeFallback) failed(err error) {
	f.errors.Inc()
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.failing {
		f.log.Warn("rate limit store failed; each instance applies the limits alone until it is back", "err", err, "retry", f.retry)
	}
	f.failing = true
	f.nextTry = time.Now().Add(f.retry)
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
		if l.TokenBurst == 0 {
			l.TokenBurst = int(math.Ceil(l.TokensPerMinute))
		}
		return l
	}
	cfg.Default = withBurst(cfg.Default)
	tenants := make(map[string]TenantLimit, len(cfg.Tenants))
	for k, v := range cfg.Tenants {
		tenants[k] = withBurst(v)
	}
	cfg.Tenants = tenants
	l := &limiter{cfg: cfg, store: cfg.Store, running: &running{n: map[string]int{}}, log: log}
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

// take debits the store, or the fallback while the store fails. by is the
// store that decided.
func (l *limiter) take(ctx context.Context, key string, lim ratelimit.Limit, cost int, force bool) (d ratelimit.Decision, by LimitStore, err error) {
	if l.fallback == nil {
		d, err := l.store.Take(ctx, key, lim, cost, force)
		return d, l.store, err
	}
	return l.fallback.take(ctx, l.store, key, lim, cost, force)
}

// refundTimeout bounds a refund: it runs as a request ends, and a store
// that is slow to answer must not hold the end of the response for long.
// A refund that times out is dropped; the tenant loses those tokens until
// the bucket refills.
const refundTimeout = 250 * time.Millisecond

// refund gives n units back to by, the store that took them. It never
// fails the request: a refund the store cannot take is logged and
// dropped.
func (l *limiter) refund(ctx context.Context, by LimitStore, key string, lim ratelimit.Limit, n int) {
	// The request may be over, its context cancelled; the refund is not.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), refundTimeout)
	defer cancel()
	var err error
	if l.fallback != nil && by == l.store {
		err = l.fallback.refund(ctx, by, key, lim, n)
	} else {
		err = by.Refund(ctx, key, lim, n)
	}
	if err != nil {
		l.log.Debug("unused tokens not given back", "key", key, "tokens", n, "err", err)
	}
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
	// reserved is what the request holds of its tenant's tokens-per-minute
	// bucket until it ends, in reservedBy; 0 once settled.
	reserved   int
	reservedBy LimitStore
}

// admit checks the concurrency cap, reserves maxTokens against the
// tokens-per-minute bucket, and checks the request rate. On success it
// sets the RateLimit headers of the policies that apply on h and the
// caller must call release when the request ends.
func (l *limiter) admit(ctx context.Context, tenant string, maxTokens int, h http.Header) (*admission, error) {
	lim := l.limitOf(tenant)
	a := &admission{l: l, tenant: tenant, limit: lim}
	if !lim.any() {
		return a, nil
	}
	if lim.TokensPerMinute > 0 && maxTokens > lim.TokenBurst {
		return nil, &overBurst{tenant: tenant, tokens: maxTokens, burst: lim.TokenBurst}
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
	// The reservation comes before the request rate: a refusal by the
	// rate gives it back, while a unit of request rate spent on a request
	// the tokens refuse would be lost.
	var policies, states []string
	if lim.TokensPerMinute > 0 {
		bucket := ratelimit.Limit{Rate: lim.TokensPerMinute / 60, Burst: lim.TokenBurst}
		d, by, err := l.take(ctx, "tpm:"+tenant, bucket, maxTokens, false)
		if err != nil {
			// Only a request whose context ended gets here (the
			// fallback answers when the store fails): admit, and let
			// the caller log.
			return a, fmt.Errorf("rate limit store: %w", err)
		}
		policy := fmt.Sprintf(`"tokens_per_minute";q=%d;w=%d`, lim.TokenBurst, ceilSeconds(secondsFor(lim.TokenBurst, bucket.Rate)))
		state := fmt.Sprintf(`"tokens_per_minute";r=%d;t=%d`, d.Remaining, ceilSeconds(d.Reset))
		if !d.OK {
			a.release(ctx, 0)
			return nil, &rateLimited{tenant: tenant, limit: limitTokensPerMinute, retryAfter: d.Wait, policy: policy, state: state}
		}
		a.reserved, a.reservedBy = maxTokens, by
		policies, states = append(policies, policy), append(states, state)
	}
	if lim.RequestsPerSecond > 0 {
		bucket := ratelimit.Limit{Rate: lim.RequestsPerSecond, Burst: lim.RequestBurst}
		d, _, err := l.take(ctx, "req:"+tenant, bucket, 1, false)
		if err != nil {
			return a, fmt.Errorf("rate limit store: %w", err)
		}
		policy := fmt.Sprintf(`"requests";q=%d;w=%d`, lim.RequestBurst, ceilSeconds(secondsFor(lim.RequestBurst, lim.RequestsPerSecond)))
		state := fmt.Sprintf(`"requests";r=%d;t=%d`, d.Remaining, ceilSeconds(d.Reset))
		if !d.OK {
			a.release(ctx, 0)
			return nil, &rateLimited{tenant: tenant, limit: limitRequests, retryAfter: d.Wait, policy: policy, state: state}
		}
		// The request policy leads, as it did alone.
		policies, states = append([]string{policy}, policies...), append([]string{state}, states...)
	}
	if len(policies) > 0 {
		h.Set("RateLimit-Policy", strings.Join(policies, ", "))
		h.Set("RateLimit", strings.Join(states, ", "))
	}
	return a, nil
}

// settle gives back what the request did not use of its token
// reservation: used is the completion tokens it received. Only the first
// call counts; call it as soon as the outcome is known, so that the
// tenant's next request can count on the tokens.
func (a *admission) settle(ctx context.Context, used int) {
	if a.reserved == 0 {
		return
	}
	unused := a.reserved - used
	a.reserved = 0
	if unused <= 0 {
		return
	}
	bucket := ratelimit.Limit{Rate: a.limit.TokensPerMinute / 60, Burst: a.limit.TokenBurst}
	a.l.refund(ctx, a.reservedBy, "tpm:"+a.tenant, bucket, unused)
}

// release ends the request's hold: it settles the token reservation, if
// not yet, with used tokens received, and frees the concurrency slot.
func (a *admission) release(ctx context.Context, used int) {
	a.settle(ctx, used)
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
	d, _, err := a.l.take(ctx, a.tokKey, bucket, n, !a.l.cfg.CutOff)
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
