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
//  4. Within a tenant and an effective urgency, oldest first; newest
//     first while lifo is set (the scheduler sets it while its
//     controlled-delay guard is failing stale requests, Config.LIFO).
type queue struct {
	aging  time.Duration
	lifo   bool
	items  []*waiter // in arrival order
	vtime  [priority.Levels]float64
	pass   [priority.Levels]map[string]float64 // tenant virtual time per level
	counts map[string]int                      // queued per tenant
	models map[string]int                      // queued per model

	// pop's scratch, kept between calls: each item's effective urgency,
	// and whether pop has ruled it out.
	levels []int
	tried  []bool
}

func newQueue(aging time.Duration) *queue {
	q := &queue{aging: aging, counts: map[string]int{}, models: map[string]int{}}
	for i := range q.pass {
		q.pass[i] = map[string]float64{}
	}
	return q
}

func (q *queue) len() int               { return len(q.items) }
func (q *queue) tenantLen(t string) int { return q.counts[t] }
func (q *queue) modelLen(m string) int  { return q.models[m] }

// ahead counts the requests for model that would be served before a new
// one of urgency u: those whose effective urgency at now is u or less.
func (q *queue) ahead(model string, u priority.Urgency, now time.Time) int {
	n := 0
	for _, w := range q.items {
		if w.model == model && q.level(w, now) <= int(u) {
			n++
		}
	}
	return n
}

func (q *queue) push(w *waiter) {
	w.queued = true
	q.items = append(q.items, w)
	q.counts[w.tenant]++
	q.models[w.model]++
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
	if q.models[w.model]--; q.models[w.model] == 0 {
		delete(q.models, w.model)
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
// is empty or admit refuses every request in it. Requests are offered to
// admit in the order above; admit takes one when a backend of its model
// has a slot for it at its effective urgency. A refusal passes the turn
// to the next request, which matters only for another model's: the
// model refused has no slot for anything less urgent either (the urgent
// reserve only ever narrows as urgency falls), so the rest of its
// requests are skipped unasked.
//
// Requests for different models share the queue's order but not each
// other's slots: a model whose backends are full never holds up one whose
// backends are free. A tenant whose request waits on a full model while
// another model's request is served at its level restarts at the level's
// virtual time, as if it had been idle.
func (q *queue) pop(now time.Time, admit func(w *waiter, level int) bool) *waiter {
	if len(q.items) == 0 {
		return nil
	}
	// Each request's effective urgency, computed once; tried marks those
	// admit refused, or that a refusal of their model rules out.
	q.levels = q.levels[:0]
	q.tried = q.tried[:0]
	lowest := priority.Levels
	for _, w := range q.items {
		l := q.level(w, now)
		q.levels = append(q.levels, l)
		q.tried = append(q.tried, false)
		lowest = min(lowest, l)
	}
	for level := lowest; level < priority.Levels; level++ {
		pass := q.pass[level]
		for {
			// The next request at this level: the tenant with the
			// smallest virtual time, its oldest request (arrival order
			// breaks ties). One scan per try, as the first try almost
			// always takes it.
			pick := -1
			var pickPass float64
			for i, w := range q.items {
				if q.levels[i] != level || q.tried[i] {
					continue
				}
				p := max(pass[w.tenant], q.vtime[level])
				if pick < 0 || p < pickPass || (q.lifo && p == pickPass && w.tenant == q.items[pick].tenant) {
					pick, pickPass = i, p
				}
			}
			if pick < 0 {
				break
			}
			w := q.items[pick]
			if admit(w, level) {
				q.vtime[level] = pickPass
				pass[w.tenant] = pickPass + w.cost/w.weight
				q.pruneLevel(level)
				q.remove(w)
				return w
			}
			q.tried[pick] = true
			if len(w.exclude) > 0 {
				continue // its refusal says nothing of the model's other requests
			}
			// The model has no room for w: none for a request as wide
			// either, but a narrower one (fewer choices) may still fit
			// where w does not, so it is tried in turn. A wide request
			// can thus wait while narrow ones take the slots freed one by
			// one, up to its deadline; it never holds them back.
			for i, o := range q.items {
				if o.model == w.model && len(o.exclude) == 0 && o.width >= w.width {
					q.tried[i] = true
				}
			}
		}
	}
	return nil
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
	clear(q.models)
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
