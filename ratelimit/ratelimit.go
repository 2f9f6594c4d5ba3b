package ratelimit

import (
	"context"
	"math"
	"sync"
	"time"
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

// Local keeps one token bucket per key, in this process only.
//
// It keeps its own buckets rather than golang.org/x/time/rate's Limiter
// because a Limiter cannot take units back once a reservation has been
// acted on (Reservation.Cancel restores only time not yet used), and
// Refund must.
type Local struct {
	now func() time.Time

	mu   sync.Mutex
	keys map[string]*bucket
}

// bucket holds tokens as of last; it refills at lim.Rate up to lim.Burst.
// tokens falls below 0 by a forced Take's debt.
type bucket struct {
	lim    Limit
	tokens float64
	last   time.Time
}

// NewLocal returns an empty in-process store.
func NewLocal() *Local { return &Local{now: time.Now, keys: map[string]*bucket{}} }

// bucketAt returns key's bucket refilled up to now under lim, creating it
// full. A changed lim applies from now: what the bucket earned until now
// it earned at the old rate. l.mu must be held.
func (l *Local) bucketAt(key string, lim Limit, now time.Time) *bucket {
	b := l.keys[key]
	if b == nil {
		b = &bucket{lim: lim, tokens: float64(lim.Burst), last: now}
		l.keys[key] = b
		return b
	}
	b.advance(now)
	b.lim = lim
	b.advance(now) // a smaller burst caps what the bucket holds
	return b
}

func (b *bucket) advance(now time.Time) {
	if now.After(b.last) {
		b.tokens += now.Sub(b.last).Seconds() * b.lim.Rate
		b.last = now
	}
	b.tokens = min(b.tokens, float64(b.lim.Burst))
}

// Take debits cost units from key's bucket. Unless force is set, a Take the
// bucket cannot cover now debits nothing and returns OK false; a forced Take
// always debits and returns the debt as Wait, which paces the caller.
func (l *Local) Take(_ context.Context, key string, lim Limit, cost int, force bool) (Decision, error) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.bucketAt(key, lim, now)
	var d Decision
	switch {
	case cost > lim.Burst && !force:
		// Never fits: say when a full bucket would be back, the best
		// advice there is.
		d.Wait = secs(float64(lim.Burst) / lim.Rate)
	case b.tokens < float64(cost) && !force:
		d.Wait = secs((float64(cost) - b.tokens) / lim.Rate)
	default:
		b.tokens -= float64(min(cost, lim.Burst))
		d.OK, d.Wait = true, secs(-b.tokens/lim.Rate)
		if extra := cost - lim.Burst; extra > 0 {
			// A forced debit larger than the burst: the rest is debt too.
			d.Wait += secs(float64(extra) / lim.Rate)
		}
	}
	d.Remaining = max(0, int(math.Floor(b.tokens)))
	d.Reset = secs((float64(lim.Burst) - b.tokens) / lim.Rate)
	return d, nil
}

// Refund gives n units back to key's bucket, as though a Take of them had
// never happened, but never fills it past lim.Burst. A key without a
// bucket is full already.
func (l *Local) Refund(_ context.Context, key string, lim Limit, n int) error {
	if n <= 0 {
		return nil
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.keys[key] == nil {
		return nil
	}
	b := l.bucketAt(key, lim, now)
	b.tokens = min(b.tokens+float64(n), float64(lim.Burst))
	return nil
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
