package ratelimit

import (
	"context"
	"testing"
	"time"

	"h3infer/internal/redistest"
)

type store interface {
	Take(ctx context.Context, key string, lim Limit, cost int, force bool) (Decision, error)
	Refund(ctx context.Context, key string, lim Limit, n int) error
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

// TestRefund holds both stores to one contract for giving units back: what
// is refunded can be taken again, never more than the burst, and a forced
// debt is paid back first.
func TestRefund(t *testing.T) {
	stores := map[string]store{
		"local": NewLocal(),
		"redis": NewRedis(redistest.Start(t), "test:"),
	}
	ctx := context.Background()
	// One unit per 100s: nothing comes back by itself while the test runs.
	lim := Limit{Rate: 0.01, Burst: 100}
	take := func(t *testing.T, s store, key string, cost int, want bool) Decision {
		t.Helper()
		d, err := s.Take(ctx, key, lim, cost, false)
		if err != nil {
			t.Fatal(err)
		}
		if d.OK != want {
			t.Fatalf("take %d of %s: %+v, want OK %v", cost, key, d, want)
		}
		return d
	}
	refund := func(t *testing.T, s store, key string, n int) {
		t.Helper()
		if err := s.Refund(ctx, key, lim, n); err != nil {
			t.Fatal(err)
		}
	}
	for name, s := range stores {
		t.Run(name, func(t *testing.T) {
			// A reservation of 100 that used 10 gives back 90.
			take(t, s, "a", 100, true)
			take(t, s, "a", 1, false)
			refund(t, s, "a", 90)
			if d := take(t, s, "a", 90, true); d.Remaining != 0 {
				t.Errorf("after taking the 90 refunded: remaining %d, want 0", d.Remaining)
			}
			take(t, s, "a", 1, false)

			// Refunds never fill a bucket past its burst.
			take(t, s, "b", 30, true)
			refund(t, s, "b", 30)
			refund(t, s, "b", 1000)
			if d := take(t, s, "b", 1, true); d.Remaining != 99 {
				t.Errorf("after refunding more than was taken: remaining %d, want 99", d.Remaining)
			}
			take(t, s, "b", 100, false)
			// A key never taken from is full: a refund adds nothing.
			refund(t, s, "c", 50)
			take(t, s, "c", 100, true)
			take(t, s, "c", 1, false)

			// A forced take runs into debt; a refund pays the debt
			// before it makes room.
			take(t, s, "d", 100, true)
			if d, err := s.Take(ctx, "d", lim, 50, true); err != nil || !d.OK {
				t.Fatalf("forced take: %+v, %v", d, err)
			}
			refund(t, s, "d", 60)
			take(t, s, "d", 11, false)
			take(t, s, "d", 10, true)
		})
	}
}
