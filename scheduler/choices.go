package scheduler

import (
	"fmt"

	"h3infer/priority"
)

// A request with several choices (infer.Request.N) runs them as rows of
// one backend's batch, so it takes that many slots of one backend at
// once: it is reserved, queued, and released as that many.

// ChoicesError refuses a request for more choices than any backend of
// its model could ever run at once at the request's urgency: such a
// request would wait in the queue until its deadline.
type ChoicesError struct {
	Choices int // what the request asked for
	Most    int // the most slots one backend may give it
}

func (e *ChoicesError) Error() string {
	return fmt.Sprintf("scheduler: %d choices need %d slots of one backend, and at most %d are open to this request", e.Choices, e.Choices, e.Most)
}

// widestLocked is the most slots one backend of model may give a request
// of effective urgency level (Slots less the urgent reserve for a request
// that is not urgent), and whether any backend of the model says how
// many slots it has yet.
func (s *Scheduler) widestLocked(model string, level priority.Urgency) (most int, ok bool) {
	reserve := 0
	if s.cfg.Classes.Of(level) != priority.Urgent {
		reserve = *s.cfg.UrgentReserve
	}
	for _, b := range s.backends.Backends(model) {
		if b == nil {
			continue
		}
		slots := b.Slots()
		if slots <= 0 {
			continue
		}
		most, ok = max(most, openSlots(slots, reserve)), true
	}
	return most, ok
}

// openSlots is how many of a backend's slots a request may use when
// reserve of them are kept for urgent requests: every backend keeps at
// least one slot for everyone.
func openSlots(slots, reserve int) int {
	if reserve > 0 {
		return max(slots-reserve, 1)
	}
	return slots
}
