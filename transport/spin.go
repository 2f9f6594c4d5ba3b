//go:build linux

package transport

import (
	"runtime"
	"time"
)

// # Spinning before the sleep
//
// A futex sleep costs its wake: the producer's syscall, and the kernel
// scheduling the sleeper's thread again, tens of microseconds on this
// machine when the CPU had gone idle. While records arrive back to back
// (the tokens of many streams, a peer answering at once) the next one
// usually comes sooner than that, so the consumer first polls tail for a
// while and sleeps only if nothing came.
//
// The poll is bounded and adaptive. The consumer keeps a moving average
// of how long its recent waits lasted, each sample capped at spinLimit,
// so a long idle spell counts as one long wait, not as minutes. It spins
// only while that average is below spinArm (10 µs), for at most twice the
// average plus 2 µs, never longer than spinLimit. An idle ring's waits
// are long, so its average climbs past spinArm within a few waits and it
// sleeps at once; the first wait after a burst spins once, for at most
// 22 µs. A spin that fails, or succeeds only in the second half of its
// budget, counts as a wait of the cap: a consumer whose peer is slower
// than the spin, or is not running (on a loaded machine a spinner takes
// the CPU its peer would run on), stops spinning after a miss or two.
// Spinning never holds the processor: each poll yields it
// (runtime.Gosched), so the goroutines the consumer just readied (a
// call's consumer, a worker's loop) run on it first.
//
// The threshold is low on purpose. With it at 44 µs, two processes
// answering each other (BenchmarkRoundTrip) settled into spinning at
// each other in some runs, 1.6 µs a round trip, and in others, on the
// same loaded machine, into spins that succeeded late because the
// spinner itself kept its peer off the CPU: 80 µs, three times the plain
// sleep (docs/BENCHMARKS.md, "Issue #18"). At 10 µs a consumer spins only
// for a producer that keeps the pace by itself, and a peer that must wake
// to answer is waited for asleep, as before.
//
// A wait that slept is measured to when the producer rang the doorbell
// (ring.rungAt), not to when the sleeper ran again: the kernel's wake-up
// (about 25 µs here, far more on a loaded machine) is the cost spinning
// saves, not part of how fast the producer is, so a producer that streams
// fast to a sleeping consumer arms its spin.
const (
	// spinLimit bounds one spin and caps each wait's sample.
	spinLimit = 50 * time.Microsecond
	// spinArm is the average wait under which the consumer spins.
	spinArm = 10 * time.Microsecond
	// spinWeight is the average's smoothing: each new sample moves it by
	// 1/spinWeight of the difference.
	spinWeight = 8
)

// spinner is a consumer's record of its recent waits. It is private to the
// consumer, like consHead, and lives in process memory.
type spinner struct {
	avg time.Duration // moving average of recent waits, each capped at spinLimit; 0 at first
}

// budget is how long a wait that starts now may spin before it sleeps:
// zero unless recent waits were short (a new ring's are taken to be).
func (s *spinner) budget() time.Duration {
	if s.avg >= spinArm {
		return 0
	}
	return min(2*s.avg+2*time.Microsecond, spinLimit)
}

// record adds one wait's length to the average.
func (s *spinner) record(d time.Duration) {
	s.avg += (min(d, spinLimit) - s.avg) / spinWeight
}

// spin polls tail until the producer publishes past consHead, the ring
// closes, or budget has passed since start. It reports whether data came.
func (r *ring) spin(start time.Time, budget time.Duration) bool {
	for {
		runtime.Gosched()
		if r.consTail = r.tail.Load(); r.consTail != r.consHead {
			return true
		}
		if r.closed.Load() != 0 || time.Since(start) >= budget {
			return false
		}
	}
}
