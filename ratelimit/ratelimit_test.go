package ratelimit

import (
	"context"
	"testing"
	"time"

	"h3infer/internal/redistest"
)

type store interface {
	Take(ctx context.Context, key string, lim Limit, cost int, force bool) (Decision, error)
}

// TestStores holds both stores to one contract: a burst is admitted whole,
// the next unit is refused with a sensible wait, and a forced take is
// debited and returns its debt.
func TestStores(t *testing.T) {
	stores := map[string]store{
		"local": NewLocal(),
		"redis": NewRedis(redistest.Start(t), "test:"),
	}
	ctx := context.Background()
	for name, s := range stores {
		t.Run(name, func(t *testing.T) {
			lim := Limit{Rate: 0.5, Burst: 3} // one unit per 2s
			for i := range 3 {
				d, err := s.Take(ctx, "a", lim, 1, false)
				if err != nil || !d.OK {
					t.Fatalf("take %d: %+v, %v; want admitted", i, d, err)
				}
				if d.Remaining != 2-i {
					t.Errorf("take %d: remaining %d, want %d", i, d.Remaining, 2-i)
				}
			}
			d, err := s.Take(ctx, "a", lim, 1, false)
			if err != nil || d.OK {
				t.Fatalf("4th take: %+v, %v; want refused", d, err)
			}
			// The next unit is due 2s after the first take, less what the
			// test spent; generous bounds for a loaded machine.
			if d.Wait < time.Second || d.Wait > 2*time.Second {
				t.Errorf("refused wait %v, want 1s..2s", d.Wait)
			}
			if d.Reset < 4*time.Second || d.Reset > 6*time.Second {
				t.Errorf("reset %v, want about 6s", d.Reset)
			}
			// Another key has its own bucket.
			if d, err := s.Take(ctx, "b", lim, 3, false); err != nil || !d.OK {
				t.Errorf("other key: %+v, %v; want admitted", d, err)
			}
			// Forced: debited anyway, the debt comes back as the wait.
			d, err = s.Take(ctx, "a", lim, 2, true)
			if err != nil || !d.OK {
				t.Fatalf("forced take: %+v, %v", d, err)
			}
			if d.Wait < 3*time.Second || d.Wait > 4*time.Second {
				t.Errorf("forced wait %v, want about 4s (2 units of debt at 0.5/s)", d.Wait)
			}
			// Cost above the burst never fits unforced.
			if d, err := s.Take(ctx, "c", lim, 4, false); err != nil || d.OK {
				t.Errorf("cost above burst: %+v, %v; want refused", d, err)
			}
		})
	}
}
