package ratelimit

import (
	"context"
	"math"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Limit is one bucket's shape: Rate units per second refill it, up to Burst.
type Limit struct {
	Rate  float64
	Burst int
}

// Decision is the outcome of a Take.
type Decision struct {
	// OK is true when the units were debited.
	OK bool
	// Wait is how long until the units fit: the time to wait before
	// retrying a refused Take, or the debt to wait out after a forced one.
	Wait time.Duration
	// Remaining is how many whole units the bucket holds after the Take.
	Remaining int
	// Reset is how long until the bucket is full again.
	Reset time.Duration
}

// Local keeps one x/time/rate limiter per key, in this process only.
type Local struct {
	now func() time.Time

	mu   sync.Mutex
	keys map[string]*rate.Limiter
}

// NewLocal returns an empty in-process store.
func NewLocal() *Local { return &Local{now: time.Now, keys: map[string]*rate.Limiter{}} }

// Take debits cost units from key's bucket. Unless force is set, a Take the
// bucket cannot cover now debits nothing and returns OK false; a forced Take
// always debits and returns the debt as Wait, which paces the caller.
func (l *Local) Take(_ context.Context, key string, lim Limit, cost int, force bool) (Decision, error) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	rl := l.keys[key]
	if rl == nil {
		rl = rate.NewLimiter(rate.Limit(lim.Rate), lim.Burst)
		l.keys[key] = rl
	} else if rl.Limit() != rate.Limit(lim.Rate) || rl.Burst() != lim.Burst {
		rl.SetLimitAt(now, rate.Limit(lim.Rate))
		rl.SetBurstAt(now, lim.Burst)
	}
	var d Decision
	if cost > lim.Burst && !force {
		// Never fits: say when a full bucket would be back, the best
		// advice there is.
		d.Wait = secs(float64(lim.Burst) / lim.Rate)
	} else if res := rl.ReserveN(now, min(cost, lim.Burst)); !res.OK() {
		d.Wait = secs(float64(cost) / lim.Rate)
	} else if wait := res.DelayFrom(now); wait > 0 && !force {
		res.CancelAt(now)
		d.Wait = wait
	} else {
		d.OK, d.Wait = true, wait
		if extra := cost - lim.Burst; extra > 0 {
			// A forced debit larger than the burst: the rest is debt too.
			d.Wait += secs(float64(extra) / lim.Rate)
		}
	}
	tokens := rl.TokensAt(now)
	d.Remaining = max(0, int(math.Floor(tokens)))
	d.Reset = secs((float64(lim.Burst) - tokens) / lim.Rate)
	return d, nil
}

func secs(s float64) time.Duration {
	if s <= 0 || math.IsNaN(s) {
		return 0
	}
	if s > math.MaxInt64/float64(time.Second) {
		return time.Duration(math.MaxInt64)
	}
	return time.Duration(s * float64(time.Second))
}
