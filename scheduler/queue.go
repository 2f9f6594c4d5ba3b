package scheduler

import (
	"slices"
	"time"

	"h3infer/priority"
)

// queue orders waiting requests. It is a plain data structure: the
// Scheduler's lock guards it and the caller passes the current time, so
// that tests can drive it with a fake clock.
//
// Order, as documented in docs/CONFIG.md ("Scheduling"):
//
//  1. Strict priority by effective urgency, 0 first.
//  2. Aging: a request's effective urgency is its urgency minus one for
//     every full aging step it has waited, never below 0. A request of
//     urgency u therefore competes at urgency 0 after u steps at most, and
//     from then on only requests that reached urgency 0 earlier, or that
//     arrived at 0 and belong to a tenant with a smaller virtual time, can
//     pass it: its wait is bounded by u×step plus the service of the
//     (bounded) queue ahead of it at urgency 0.
//  3. Within an effective urgency, tenants share by weight with start-time
//     fair queueing (a deficit round robin without rounds): each tenant has
//     a virtual time per urgency that grows by cost/weight per request
//     served, the tenant with the smallest goes next, and a tenant that was
//     idle restarts at the level's current virtual time instead of banking
//     credit.
//  4. Within a tenant and an effective urgency, oldest first.
type queue struct {
	aging  time.Duration
	items  []*waiter // in arrival order
	vtime  [priority.Levels]float64
	pass   [priority.Levels]map[string]float64 // tenant virtual time per level
	counts map[string]int                      // queued per tenant
}

func newQueue(aging time.Duration) *queue {
	q := &queue{aging: aging, counts: map[string]int{}}
	for i := range q.pass {
		q.pass[i] = map[string]float64{}
	}
	return q
}

func (q *queue) len() int               { return len(q.items) }
func (q *queue) tenantLen(t string) int { return q.counts[t] }

func (q *queue) push(w *waiter) {
	w.queued = true
	q.items = append(q.items, w)
	q.counts[w.tenant]++
}

// remove takes w out of the queue; it reports false when w was not queued.
func (q *queue) remove(w *waiter) bool {
	if !w.queued {
		return false
	}
	i := slices.Index(q.items, w)
	q.items = slices.Delete(q.items, i, i+1)
	w.queued = false
	if q.counts[w.tenant]--; q.counts[w.tenant] == 0 {
		delete(q.counts, w.tenant)
	}
	return true
}

// level is w's effective urgency at now.
func (q *queue) level(w *waiter, now time.Time) int {
	u := int(w.urgency)
	if q.aging > 0 {
		u -= int(now.Sub(w.enqueued) / q.aging)
	}
	return max(u, 0)
}

// pop removes and returns the request to serve next, or nil when the queue
// is empty or admit refuses the next request's effective urgency. Since
// nothing behind the next request is more urgent, a refusal ends the
// dispatch round.
func (q *queue) pop(now time.Time, admit func(level int) bool) *waiter {
	if len(q.items) == 0 {
		return nil
	}
	best := priority.Levels
	for _, w := range q.items {
		best = min(best, q.level(w, now))
	}
	if !admit(best) {
		return nil
	}
	pass := q.pass[best]
	var pick *waiter
	var pickPass float64
	for _, w := range q.items { // arrival order: the first seen per tenant is its oldest
		if q.level(w, now) != best {
			continue
		}
		p := max(pass[w.tenant], q.vtime[best])
		if pick == nil || p < pickPass {
			pick, pickPass = w, p
		}
	}
	q.vtime[best] = pickPass
	pass[pick.tenant] = pickPass + pick.cost/pick.weight
	q.pruneLevel(best)
	q.remove(pick)
	return pick
}

// pruneLevel forgets tenants whose virtual time lags the level's: they would
// restart at the level's virtual time anyway, and keeping them would let the
// maps grow with every tenant name ever seen.
func (q *queue) pruneLevel(l int) {
	for t, p := range q.pass[l] {
		if p <= q.vtime[l] && q.counts[t] == 0 {
			delete(q.pass[l], t)
		}
	}
}

// drain empties the queue and returns what it held.
func (q *queue) drain() []*waiter {
	out := q.items
	q.items = nil
	clear(q.counts)
	for _, w := range out {
		w.queued = false
	}
	return out
}

// byUrgency counts queued requests by their requested urgency.
func (q *queue) byUrgency() [priority.Levels]int {
	var n [priority.Levels]int
	for _, w := range q.items {
		n[w.urgency]++
	}
	return n
}
