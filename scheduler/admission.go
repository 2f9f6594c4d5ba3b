package scheduler

import (
	"math"
	"slices"
	"time"

	"h3infer/priority"
)

// Admission by delay (Config.Admission "delay"), as documented in
// docs/CONFIG.md ("Scheduling"): the queue is kept short in time, not in
// count. Two mechanisms do it, both under the scheduler's lock:
//
//   - Prediction, on arrival: a request that finds no free slot is
//     refused at once when the requests of its model queued at its
//     urgency or a more urgent one, itself included, would take longer
//     than MaxQueueDelay to drain at the model's measured service rate.
//   - The controlled-delay guard, behind it, for what prediction gets
//     wrong (a cold model, a rate that just fell): once the oldest queued
//     request has waited past QueueDelayTarget for QueueDelayInterval,
//     every request that has waited past the target is failed rather than
//     served late, until the queue has stayed under the target for an
//     interval. Urgent requests are exempt.

// rateWindow is how long a model's completions are counted before the
// count becomes one sample of its service rate: long enough to hold
// several completions of a slow model, short enough to follow a pool that
// shrinks.
const rateWindow = time.Second

// rateWeight is a new sample's weight in the rate's moving average.
const rateWeight = 0.5

// serviceRate measures how fast a model's backends free slots, workers and
// upstreams alike: completions per second while they were saturated. A
// window in which the model ever had nothing queued at a completion says
// only how much work came, not how much the backends can do; it may raise
// the measure but not set or lower it, so a quiet model is not judged
// slow when a burst arrives.
type serviceRate struct {
	perSec    float64   // 0 until a saturated window was measured
	start     time.Time // the completion that opened the window
	n         int       // completions since start
	saturated bool      // requests were queued at start and at every completion since
}

// complete counts one completion at now; queued says whether requests for
// the model were waiting, so that the freed slot is taken at once.
func (r *serviceRate) complete(now time.Time, queued bool) {
	if r.start.IsZero() {
		r.start, r.saturated = now, queued
		return
	}
	r.n++
	r.saturated = r.saturated && queued
	elapsed := now.Sub(r.start)
	if elapsed < rateWindow {
		return
	}
	sample := float64(r.n) / elapsed.Seconds()
	switch {
	case r.saturated && r.perSec == 0:
		r.perSec = sample
	case r.saturated || (r.perSec > 0 && sample > r.perSec):
		r.perSec = rateWeight*sample + (1-rateWeight)*r.perSec
	}
	r.start, r.n, r.saturated = now, 0, queued
}

// guard is the controlled-delay guard's state.
type guard struct {
	aboveSince time.Time // the oldest waiter's wait went over the target; zero: it is not
	belowSince time.Time // while failing: it came back under the target
	failing    bool
}

// admissionStats are the counters Stats reports.
type admissionStats struct {
	refusals       map[string]uint64
	predictedSum   float64 // seconds
	predictions    uint64
	queueDelaySum  float64 // seconds
	queueDelays    uint64
	lastPrediction time.Duration
}

func (s *Scheduler) byDelay() bool { return s.cfg.Admission == AdmissionDelay }

// predictLocked returns how long a new request for model at urgency u
// would wait: the requests that would go before it, and it, drained at the
// model's measured rate. ok is false for a model not measured yet.
func (s *Scheduler) predictLocked(model string, u priority.Urgency, now time.Time) (wait time.Duration, ok bool) {
	r := s.rates[model]
	if r == nil || r.perSec == 0 {
		return 0, false
	}
	n := s.queue.ahead(model, u, now) + 1
	return seconds(float64(n) / r.perSec), true
}

// retryAfterLocked is the advice for a refused request for model: under
// delay admission, the time the model's queue takes to drain at its
// measured rate, in whole seconds and at least one; otherwise, or for a
// model not yet measured, Config.RetryAfter.
func (s *Scheduler) retryAfterLocked(model string) time.Duration {
	r := s.rates[model]
	if !s.byDelay() || r == nil || r.perSec == 0 {
		return time.Duration(s.cfg.RetryAfter)
	}
	drain := float64(s.queue.modelLen(model)) / r.perSec
	return max(time.Duration(math.Ceil(drain))*time.Second, time.Second)
}

// overloadLocked counts a refusal and returns its error.
func (s *Scheduler) overloadLocked(reason, model string) *OverloadError {
	s.adm.refusals[reason]++
	return &OverloadError{RetryAfter: s.retryAfterLocked(model), Queued: s.queue.len(), Reason: reason}
}

// exempt reports whether the guard leaves w alone: urgent requests are
// never failed for waiting, by the class they were given.
func (s *Scheduler) exempt(w *waiter) bool {
	return s.cfg.Classes.Of(w.urgency) == priority.Urgent
}

// guardLocked runs the controlled-delay guard at now (see the top of this
// file). It runs before every dispatch pass, so on every arrival that
// queues, every release and every poll.
func (s *Scheduler) guardLocked(now time.Time) {
	if !s.byDelay() {
		return
	}
	target := time.Duration(s.cfg.QueueDelayTarget)
	interval := time.Duration(s.cfg.QueueDelayInterval)
	i := slices.IndexFunc(s.queue.items, func(w *waiter) bool { return !s.exempt(w) })
	g := &s.guard
	switch {
	case i < 0:
		*g = guard{}
		return
	case now.Sub(s.queue.items[i].enqueued) > target:
		g.belowSince = time.Time{}
		if g.aboveSince.IsZero() {
			g.aboveSince = now
		}
		if now.Sub(g.aboveSince) >= interval {
			g.failing = true
		}
	case !g.failing:
		g.aboveSince = time.Time{}
	case g.belowSince.IsZero():
		g.belowSince = now
	case now.Sub(g.belowSince) >= interval:
		*g = guard{}
	}
	if !g.failing {
		return
	}
	for _, w := range slices.Clone(s.queue.items) {
		if s.exempt(w) || now.Sub(w.enqueued) <= target {
			continue
		}
		s.queue.remove(w)
		w.wake <- grant{err: s.overloadLocked(ReasonQueueDelay, w.model)}
	}
}

func seconds(f float64) time.Duration { return time.Duration(f * float64(time.Second)) }
