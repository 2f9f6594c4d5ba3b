package loadgen

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Progress is a snapshot of a run for a progress display.
type Progress struct {
	Done, Errors, InFlight int
	Elapsed                time.Duration
	// Fraction is how far the run is towards its bound, 0..1.
	Fraction float64
	// Final marks the last call, after every request finished.
	Final bool
}

// Run drives the endpoint as cfg says until its request count or duration
// is reached or ctx ends, and returns every request's sample. In-flight
// requests are waited for (each is bounded by cfg.Timeout). onProgress,
// when not nil, is called about five times a second from a goroutine Run
// owns.
func Run(ctx context.Context, cfg Config, onProgress func(Progress)) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("bench config: %w", err)
	}
	cfg = cfg.withDefaults()
	c, err := newClient(cfg)
	if err != nil {
		return nil, err
	}
	defer c.close()
	if c.early != nil {
		if err := c.primeEarly(ctx); err != nil {
			return nil, err
		}
	}

	r := &runner{cfg: cfg, client: c, start: time.Now()}
	if cfg.Duration > 0 {
		r.deadline = r.start.Add(cfg.Duration)
	}
	var watch sync.WaitGroup
	stopWatch := make(chan struct{})
	if onProgress != nil {
		watch.Go(func() {
			t := time.NewTicker(200 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-t.C:
					onProgress(r.progress())
				case <-stopWatch:
					p := r.progress()
					p.Final = true
					onProgress(p)
					return
				}
			}
		})
	}
	if cfg.Rate > 0 {
		r.openLoop(ctx)
	} else {
		r.closedLoop(ctx)
	}
	wall := time.Since(r.start)
	close(stopWatch)
	watch.Wait()
	return newResult(cfg, r.samples, wall), nil
}

type runner struct {
	cfg      Config
	client   *client
	start    time.Time
	deadline time.Time // zero: no duration bound

	issued   atomic.Int64
	done     atomic.Int64
	errors   atomic.Int64
	inFlight atomic.Int64

	mu      sync.Mutex
	samples []Sample
}

// claim reserves the next request, or says the run is over.
func (r *runner) claim(ctx context.Context) bool {
	if ctx.Err() != nil || (!r.deadline.IsZero() && !time.Now().Before(r.deadline)) {
		return false
	}
	n := r.issued.Add(1)
	return r.cfg.Requests == 0 || n <= int64(r.cfg.Requests)
}

// one runs a request drawn with rng and records it.
func (r *runner) one(ctx context.Context, rng *rand.Rand) Sample {
	prompt, out, urgency := r.cfg.PromptWords.draw(rng), r.cfg.OutputTokens.draw(rng), -1
	if r.cfg.Urgency != nil {
		urgency = r.cfg.Urgency.draw(rng)
	}
	began := time.Now()
	r.inFlight.Add(1)
	s := r.client.do(ctx, prompt, out, urgency)
	r.inFlight.Add(-1)
	s.Start = began.Sub(r.start)
	r.record(s)
	return s
}

func (r *runner) record(s Sample) {
	r.done.Add(1)
	if s.Err != "" {
		r.errors.Add(1)
	}
	r.mu.Lock()
	r.samples = append(r.samples, s)
	r.mu.Unlock()
}

func (r *runner) closedLoop(ctx context.Context) {
	var wg sync.WaitGroup
	for i := range r.cfg.Concurrency {
		rng := rand.New(rand.NewPCG(uint64(i), 0x6833))
		wg.Go(func() {
			for r.claim(ctx) {
				s := r.one(ctx, rng)
				if r.cfg.HonourRetryAfter && s.RetryAfter > 0 {
					select {
					case <-time.After(time.Duration(s.RetryAfter) * time.Second):
					case <-ctx.Done():
					}
				}
			}
		})
	}
	wg.Wait()
}

// openLoop starts requests at exponential gaps whatever the server's pace,
// so a slow server shows up as queueing in the latencies rather than as a
// lower offered load.
func (r *runner) openLoop(ctx context.Context) {
	rng := rand.New(rand.NewPCG(1, 0x6833))
	sem := make(chan struct{}, r.cfg.Concurrency)
	var wg sync.WaitGroup
	defer wg.Wait()
	next := time.Now()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		next = next.Add(time.Duration(rng.ExpFloat64() / r.cfg.Rate * float64(time.Second)))
		timer.Reset(time.Until(next))
		select {
		case <-timer.C:
		case <-ctx.Done():
			return
		}
		if !r.claim(ctx) {
			return
		}
		select {
		case sem <- struct{}{}:
		default:
			r.record(Sample{Start: time.Since(r.start), Err: ErrDropped})
			continue
		}
		reqRNG := rand.New(rand.NewPCG(rng.Uint64(), 0x6833))
		wg.Go(func() {
			defer func() { <-sem }()
			r.one(ctx, reqRNG)
		})
	}
}

func (r *runner) progress() Progress {
	p := Progress{
		Done:     int(r.done.Load()),
		Errors:   int(r.errors.Load()),
		InFlight: int(r.inFlight.Load()),
		Elapsed:  time.Since(r.start),
	}
	if r.cfg.Requests > 0 {
		p.Fraction = float64(p.Done) / float64(r.cfg.Requests)
	}
	if r.cfg.Duration > 0 {
		p.Fraction = max(p.Fraction, min(1, float64(p.Elapsed)/float64(r.cfg.Duration)))
	}
	return p
}
