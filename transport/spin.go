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
// machine when the CPU had gone idle. While the traffic on a ring is
// back to back (a request and its answer, the tokens of many streams) the
// next record usually arrives sooner than that, so the consumer first
// polls tail for a while and sleeps only if nothing came.
//
// The poll is bounded and adaptive. The consumer keeps a moving average
// of how long its recent waits lasted, each sample capped at spinLimit, so
// the average reads how often waits were short as much as how short they
// were, and a long idle spell counts as one long wait, not as minutes. It
// spins only while that average is below spinArm, for at most twice the
// average and never longer than spinLimit. An idle ring's waits are all
// long, so its average sits at the cap and it goes straight to sleep; the
// first wait after a burst may spin once, for at most spinLimit, and the
// average then says the traffic has stopped. A spin that fails costs its
// time and counts as a wait of the cap: a consumer whose peer is slower
// than the spin, or is not running at all (on a loaded machine, a spinner
// takes the CPU its peer would run on), stops spinning after a few misses.
//
// A wait that slept is measured to when the producer rang the doorbell
// (ring.rungAt), not to when the sleeper ran again: the kernel's wake-up
// (about 25 µs here, far more on a loaded machine) is the cost spinning
// saves, not part of how long the data took. Measured to the wake-up, a
// consumer and its peer that answer each other at once would both see
// waits as long as a wake, stay asleep and never learn otherwise. Spinning never holds the processor:
// each poll yields it (runtime.Gosched), so the goroutines the consumer
// just readied (a call's consumer, a worker's loop) run on it first, as
// the yield before the sleep does.
const (
	// spinLimit bounds one spin and caps each wait's sample.
	spinLimit = 50 * time.Microsecond
	// spinArm is the average wait under which the consumer spins.
	spinArm = spinLimit - spinLimit/8
	// spinWeight is the average's smoothing: each new sample moves it by
	// 1/spinWeight of the difference.
	spinWeight = 8
)

// spinner is a consumer's record of its recent waits. It is private to the
// consumer, like consHead, and lives in process memory.
type spinner struct {
	avg      time.Duration // moving average of recent waits, each capped at spinLimit
	measured bool          // avg holds at least one sample; until then the consumer does not spin
}

// budget is how long a wait that starts now may spin before it sleeps:
// zero unless recent waits were short.
func (s *spinner) budget() time.Duration {
	if !s.measured || s.avg >= spinArm {
		return 0
	}
	return min(2*s.avg+2*time.Microsecond, spinLimit)
}

// record adds one wait's length to the average.
func (s *spinner) record(d time.Duration) {
	d = min(d, spinLimit)
	if !s.measured {
		s.avg, s.measured = d, true
		return
	}
	s.avg += (d - s.avg) / spinWeight
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
