package loadgen

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// OverloadConfig is the overload scenario: what a server does under
// several times the load it can serve, measured against what it does at
// its capacity, in one run.
//
//  1. capacity: a closed loop at CapacityConcurrency for CapacityDuration;
//     requests finished within it per second are the capacity;
//  2. unloaded: Unloaded requests at urgency 0, one a second;
//  3. overload: an open loop at Factor times the capacity for Duration,
//     and beside it, on a connection of its own, urgency-0 probes at one
//     a second for the same time;
//  4. recovery: from the end of the overload's arrivals (its admitted
//     requests still draining), one request at a time for Recovery.
//
// The server's resident set is read every 100 ms throughout when PID is
// set.
type OverloadConfig struct {
	// Base is the endpoint and the requests' shape (URL, TLS, credential,
	// model, prompt and output lengths, timeout); its concurrency, rate,
	// bounds and urgency are set per phase.
	Base Config
	// PID is the server process whose VmRSS is sampled (0: none).
	PID int

	CapacityConcurrency int           // default 64
	CapacityDuration    time.Duration // default 10s
	Unloaded            int           // default 5
	Factor              float64       // default 5
	Duration            time.Duration // default 15s
	Recovery            time.Duration // default 5s
	// MaxInFlight bounds the overload's requests in flight; arrivals past
	// it are counted as dropped by the client. Default 1000, under the
	// gateway's default 1,024 streams per connection, so that no request
	// waits at the client for a stream.
	MaxInFlight int
}

// Defaults of OverloadConfig.
const (
	DefaultCapacityConcurrency = 64
	DefaultCapacityDuration    = 10 * time.Second
	DefaultUnloaded            = 5
	DefaultOverloadFactor      = 5
	DefaultOverloadDuration    = 15 * time.Second
	DefaultRecovery            = 5 * time.Second
	DefaultOverloadInFlight    = 1000

	// probeInFlight bounds the urgency-0 requests sent at one a second:
	// enough that a Poisson gap shorter than a slow answer is not dropped.
	probeInFlight = 16
	// rssInterval is how often the server's resident set is read.
	rssInterval = 100 * time.Millisecond
	// recoveredWithin is the recovery goal the table checks: every figure
	// back to its unloaded value this long after the overload ends.
	recoveredWithin = 2 * time.Second
	// recoveredTTFT is how far above the unloaded median TTFT a recovery
	// request may be and still count as back to normal.
	recoveredTTFT = 1.5
)

func (c OverloadConfig) withDefaults() OverloadConfig {
	if c.CapacityConcurrency == 0 {
		c.CapacityConcurrency = DefaultCapacityConcurrency
	}
	if c.CapacityDuration == 0 {
		c.CapacityDuration = DefaultCapacityDuration
	}
	if c.Unloaded == 0 {
		c.Unloaded = DefaultUnloaded
	}
	if c.Factor == 0 {
		c.Factor = DefaultOverloadFactor
	}
	if c.Duration == 0 {
		c.Duration = DefaultOverloadDuration
	}
	if c.Recovery == 0 {
		c.Recovery = DefaultRecovery
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = DefaultOverloadInFlight
	}
	return c
}

// Validate reports every problem at once, each naming its flag.
func (c OverloadConfig) Validate() error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, a...)))
	}
	if c.PID < 0 {
		bad("overload-pid", "must be >= 0, got %d", c.PID)
	}
	if c.CapacityConcurrency < 0 {
		bad("overload-capacity-concurrency", "must be >= 1, got %d", c.CapacityConcurrency)
	}
	if c.Unloaded < 0 {
		bad("overload-unloaded", "must be >= 1, got %d", c.Unloaded)
	}
	if c.Factor < 0 {
		bad("overload-factor", "must be > 0, got %v", c.Factor)
	}
	for key, d := range map[string]time.Duration{
		"overload-capacity-duration": c.CapacityDuration, "overload-duration": c.Duration, "overload-recovery": c.Recovery,
	} {
		if d < 0 {
			bad(key, "must be > 0, got %s", d)
		}
	}
	if c.MaxInFlight < 0 {
		bad("overload-max-in-flight", "must be >= 1, got %d", c.MaxInFlight)
	}
	base := c.Base
	base.Duration = time.Second // bounded per phase
	if err := base.Validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// OverloadResult is one run of the scenario and the figures derived from
// it.
type OverloadResult struct {
	Label string `json:"label,omitempty"`

	Capacity *Result `json:"capacity"`
	// CapacityRPS is the requests the closed loop finished within its
	// duration, per second.
	CapacityRPS float64 `json:"capacity_rps"`
	Unloaded    *Result `json:"unloaded_u0"`
	// Overload is the open loop at OverloadRate; Probe the urgency-0
	// requests beside it.
	Overload     *Result `json:"overload"`
	OverloadRate float64 `json:"overload_rate"`
	Probe        *Result `json:"overload_u0"`
	// GoodputRPS is the overload's requests that finished (ok) within its
	// duration, per second.
	GoodputRPS float64  `json:"goodput_rps"`
	Recovery   *Result  `json:"recovery"`
	RSS        []RSSRow `json:"rss,omitempty"`

	// RecoveryTime is from the end of the overload's arrivals to the start
	// of the first recovery request that was answered with a TTFT within
	// 1.5 times the unloaded median; Recovered is false when none was.
	RecoveryTime time.Duration `json:"recovery_time_ns"`
	Recovered    bool          `json:"recovered"`
	// Settled says every recovery request that started 2 s or more after
	// the overload's end was answered within that TTFT; Late is how many
	// were not, of Checked.
	Settled bool `json:"settled_within_2s"`
	Late    int  `json:"late_after_2s"`
	Checked int  `json:"checked_after_2s"`
}

// RSSRow is one reading of the server's resident set.
type RSSRow struct {
	At    time.Duration `json:"at_ns"`
	Bytes int64         `json:"bytes"`
}

// RunOverload runs the scenario against cfg.Base.URL. phase, when not
// nil, is told each phase as it starts.
func RunOverload(ctx context.Context, cfg OverloadConfig, phase func(string)) (*OverloadResult, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("overload config: %w", err)
	}
	cfg = cfg.withDefaults()
	if phase == nil {
		phase = func(string) {}
	}
	u0, _ := ParseUrgencyMix("0:1")
	res := &OverloadResult{}

	// The resident set, from before the first request to after the last.
	began := time.Now()
	stopRSS := make(chan struct{})
	var rssDone sync.WaitGroup
	var rssErr error
	if cfg.PID != 0 {
		read := func() bool {
			b, err := ReadRSS(cfg.PID)
			if err != nil {
				rssErr = err
				return false
			}
			res.RSS = append(res.RSS, RSSRow{At: time.Since(began), Bytes: b})
			return true
		}
		if !read() {
			return nil, rssErr
		}
		rssDone.Go(func() {
			t := time.NewTicker(rssInterval)
			defer t.Stop()
			for {
				select {
				case <-t.C:
					if !read() {
						return
					}
				case <-stopRSS:
					read()
					return
				}
			}
		})
	}
	stop := func() error {
		close(stopRSS)
		rssDone.Wait()
		return rssErr
	}

	run := func(c Config) (*Result, error) {
		r, err := Run(ctx, c, nil)
		if err == nil && ctx.Err() != nil {
			err = ctx.Err()
		}
		return r, err
	}

	phase("capacity")
	c := cfg.Base
	c.Concurrency, c.Duration, c.Requests, c.Rate, c.Urgency = cfg.CapacityConcurrency, cfg.CapacityDuration, 0, 0, nil
	// Closed-loop clients that retried a refusal at once would turn a
	// gateway that bounds its queue in time into a refusal storm.
	c.HonourRetryAfter = true
	var err error
	if res.Capacity, err = run(c); err != nil {
		stop()
		return nil, err
	}
	res.CapacityRPS = finishedWithin(res.Capacity, cfg.CapacityDuration)
	if res.CapacityRPS == 0 {
		stop()
		return nil, errors.New("capacity: no request finished within the capacity run")
	}

	phase("unloaded")
	c = cfg.Base
	c.Concurrency, c.Rate, c.Requests, c.Duration, c.Urgency = probeInFlight, 1, cfg.Unloaded, 0, u0
	if res.Unloaded, err = run(c); err != nil {
		stop()
		return nil, err
	}

	phase("overload")
	res.OverloadRate = cfg.Factor * res.CapacityRPS
	over := cfg.Base
	over.Concurrency, over.Rate, over.Duration, over.Requests, over.Urgency = cfg.MaxInFlight, res.OverloadRate, cfg.Duration, 0, nil
	probe := cfg.Base
	probe.Concurrency, probe.Rate, probe.Duration, probe.Requests, probe.Urgency = probeInFlight, 1, cfg.Duration, 0, u0
	var wg sync.WaitGroup
	var overErr, probeErr error
	overStart := time.Now()
	wg.Go(func() { res.Overload, overErr = run(over) })
	wg.Go(func() { res.Probe, probeErr = run(probe) })

	// Recovery starts when the overload's arrivals end, while what it
	// admitted still drains.
	select {
	case <-time.After(time.Until(overStart.Add(cfg.Duration))):
	case <-ctx.Done():
	}
	phase("recovery")
	rc := cfg.Base
	rc.Concurrency, rc.Rate, rc.Duration, rc.Requests, rc.Urgency = 1, 0, cfg.Recovery, 0, nil
	recStart := time.Since(overStart.Add(cfg.Duration))
	res.Recovery, err = run(rc)
	wg.Wait()
	if err = errors.Join(err, overErr, probeErr, stop()); err != nil {
		return nil, err
	}
	res.GoodputRPS = finishedWithin(res.Overload, cfg.Duration)
	res.recovery(recStart)
	return res, nil
}

// finishedWithin is the requests of r answered in full within d of its
// start, per second of d.
func finishedWithin(r *Result, d time.Duration) float64 {
	n := 0
	for _, s := range r.Samples {
		if s.Err == "" && s.Start+s.E2E <= d {
			n++
		}
	}
	return float64(n) / d.Seconds()
}

// recovery derives the recovery figures from the recovery run, which
// started offset after the overload's end.
func (o *OverloadResult) recovery(offset time.Duration) {
	limit := time.Duration(recoveredTTFT * float64(o.Unloaded.TTFT.P50))
	samples := slices.SortedFunc(slices.Values(o.Recovery.Samples), func(a, b Sample) int { return int(a.Start - b.Start) })
	o.Settled = true
	for _, s := range samples {
		at := offset + s.Start
		ok := s.Err == "" && s.TTFT > 0 && s.TTFT <= limit
		if ok && !o.Recovered {
			o.Recovered, o.RecoveryTime = true, max(0, at)
		}
		if at < recoveredWithin {
			continue
		}
		o.Checked++
		if !ok {
			o.Settled = false
			o.Late++
		}
	}
	if !o.Recovered {
		o.Settled = false
	}
}

// RSSStart and RSSPeak are the first and the largest resident set read
// (0 without readings).
func (o *OverloadResult) RSSStart() int64 {
	if len(o.RSS) == 0 {
		return 0
	}
	return o.RSS[0].Bytes
}

func (o *OverloadResult) RSSPeak() int64 {
	var p int64
	for _, r := range o.RSS {
		p = max(p, r.Bytes)
	}
	return p
}

// errorKinds sums the errors of every phase by kind.
func (o *OverloadResult) errorKinds() map[string]int {
	all := map[string]int{}
	for _, r := range []*Result{o.Capacity, o.Unloaded, o.Overload, o.Probe, o.Recovery} {
		for k, n := range r.Errors {
			all[k] += n
		}
	}
	return all
}

// retryAfters is every Retry-After the overload and its probes saw, in
// seconds, sorted (-1: none sent).
func (o *OverloadResult) retryAfters() []int {
	var v []int
	for _, r := range []*Result{o.Overload, o.Probe} {
		for s, n := range r.RetryAfter {
			for range n {
				v = append(v, s)
			}
		}
	}
	slices.Sort(v)
	return v
}

// Broken streams and error events: answers that started and then failed.
var (
	brokenKinds = []string{ErrStream, ErrNoDone, ErrProtocol}
	eventKinds  = []string{ErrServerEvent}
)

// WriteOverloadTable prints the runs' figures side by side, each against
// the goal.
func WriteOverloadTable(w io.Writer, runs []*OverloadResult) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	head := "figure\tgoal"
	for _, o := range runs {
		head += "\t" + o.Label
	}
	fmt.Fprintln(tw, head+"\t")
	row := func(name, goal string, f func(o *OverloadResult) string) {
		line := name + "\t" + goal
		for _, o := range runs {
			line += "\t" + f(o)
		}
		fmt.Fprintln(tw, line+"\t")
	}
	ratio := func(a, b float64) string {
		if b == 0 {
			return "-"
		}
		return fmt.Sprintf("%.2f", a/b)
	}
	row("capacity (closed loop)", "", func(o *OverloadResult) string {
		return fmt.Sprintf("%.1f req/s at c=%d", o.CapacityRPS, o.Capacity.Concurrency)
	})
	row("ttft p50 / p99 at capacity", "", func(o *OverloadResult) string {
		return fmtDur(o.Capacity.TTFT.P50) + " / " + fmtDur(o.Capacity.TTFT.P99)
	})
	row("unloaded u0 ttft p50 / p99", "", func(o *OverloadResult) string {
		return fmtDur(o.Unloaded.TTFT.P50) + " / " + fmtDur(o.Unloaded.TTFT.P99)
	})
	row("overload offered", "", func(o *OverloadResult) string {
		return fmt.Sprintf("%.1f req/s, %d sent", o.OverloadRate, o.Overload.Requests)
	})
	row("goodput in overload", "", func(o *OverloadResult) string { return fmt.Sprintf("%.1f req/s", o.GoodputRPS) })
	row("goodput / capacity", ">= 0.95", func(o *OverloadResult) string { return ratio(o.GoodputRPS, o.CapacityRPS) })
	row("admitted ttft p99 in overload", "", func(o *OverloadResult) string { return fmtDur(o.Overload.TTFT.P99) })
	row("admitted ttft p99 / at capacity", "<= 1.2", func(o *OverloadResult) string {
		return ratio(float64(o.Overload.TTFT.P99), float64(o.Capacity.TTFT.P99))
	})
	row("refusals in overload", "", func(o *OverloadResult) string {
		return fmt.Sprintf("%d of %d", o.Overload.Refused.Count, o.Overload.Requests)
	})
	row("refusal latency p50 / p99", "p99 <= 10ms", func(o *OverloadResult) string {
		return fmtDur(o.Overload.Refused.P50) + " / " + fmtDur(o.Overload.Refused.P99)
	})
	row("retry-after min / median / max", "", func(o *OverloadResult) string {
		v := o.retryAfters()
		if len(v) == 0 {
			return "-"
		}
		return fmtRetryAfter(v[0]) + " / " + fmtRetryAfter(v[(len(v)-1)/2]) + " / " + fmtRetryAfter(v[len(v)-1])
	})
	row("u0 probes ok / sent in overload", "", func(o *OverloadResult) string {
		return fmt.Sprintf("%d / %d", o.Probe.OK, o.Probe.Requests)
	})
	row("u0 ttft p99 in overload", "", func(o *OverloadResult) string { return fmtDur(o.Probe.TTFT.P99) })
	row("u0 ttft p99 / unloaded", "<= 1.5", func(o *OverloadResult) string {
		if o.Probe.TTFT.Count == 0 {
			return "- (no probe answered)"
		}
		return ratio(float64(o.Probe.TTFT.P99), float64(o.Unloaded.TTFT.P99))
	})
	row("rss start / peak", "", func(o *OverloadResult) string {
		if len(o.RSS) == 0 {
			return "-"
		}
		return fmt.Sprintf("%.1f / %.1f MiB", float64(o.RSSStart())/(1<<20), float64(o.RSSPeak())/(1<<20))
	})
	row("rss peak / start", "<= 1.2", func(o *OverloadResult) string { return ratio(float64(o.RSSPeak()), float64(o.RSSStart())) })
	row("recovery time", "<= 2s", func(o *OverloadResult) string {
		if !o.Recovered {
			return fmt.Sprintf("not within %s", o.Recovery.Wall.Round(time.Second))
		}
		return o.RecoveryTime.Round(time.Millisecond).String()
	})
	row("all back to unloaded within 2s", "yes", func(o *OverloadResult) string {
		if o.Checked == 0 && o.Recovered {
			return "- (no request after 2s)"
		}
		if o.Settled {
			return fmt.Sprintf("yes (%d requests after 2s)", o.Checked)
		}
		return fmt.Sprintf("no (%d of %d after 2s late)", o.Late, o.Checked)
	})
	count := func(kinds []string) func(o *OverloadResult) string {
		return func(o *OverloadResult) string {
			all, n := o.errorKinds(), 0
			for _, k := range kinds {
				n += all[k]
			}
			return fmt.Sprint(n)
		}
	}
	row("broken streams", "0", count(brokenKinds))
	row("error events", "0", count(eventKinds))
	row("other errors", "", func(o *OverloadResult) string {
		all := o.errorKinds()
		for _, k := range slices.Concat(brokenKinds, eventKinds, []string{refusedOverloaded, refusedRateLimited}) {
			delete(all, k)
		}
		if len(all) == 0 {
			return "0"
		}
		var parts []string
		for _, k := range slices.Sorted(maps.Keys(all)) {
			parts = append(parts, fmt.Sprintf("%s %d", k, all[k]))
		}
		return strings.Join(parts, ", ")
	})
	return tw.Flush()
}
