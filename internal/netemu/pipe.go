package netemu

import (
	"container/heap"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// Direction configures one direction of a link.
type Direction struct {
	// Delay is the one-way delay every packet is held for.
	Delay time.Duration
	// Jitter, when > 0, adds a uniform draw from [-Jitter, +Jitter] to each
	// packet's delay (never below zero); packets may then reorder.
	Jitter time.Duration
	// Loss is the probability, 0..1, that a packet is dropped.
	Loss float64
	// Limit bounds the packets held at once; 0 means DefaultLimit. A
	// packet arriving at a full queue is dropped.
	Limit int
	// Seed seeds the loss and jitter draws, so a run can be repeated.
	Seed uint64
}

// DefaultLimit is Direction.Limit's default, netem's own default queue.
const DefaultLimit = 1000

// Validate reports every problem at once.
func (d Direction) Validate() error {
	var errs []error
	if d.Delay < 0 {
		errs = append(errs, fmt.Errorf("delay: must be >= 0, got %s", d.Delay))
	}
	if d.Jitter < 0 {
		errs = append(errs, fmt.Errorf("jitter: must be >= 0, got %s", d.Jitter))
	}
	if !(d.Loss >= 0 && d.Loss <= 1) {
		errs = append(errs, fmt.Errorf("loss: must be within 0..1, got %v", d.Loss))
	}
	if d.Limit < 0 {
		errs = append(errs, fmt.Errorf("limit: must be >= 0, got %d", d.Limit))
	}
	return errors.Join(errs...)
}

// Stats counts what one direction did with its packets.
type Stats struct {
	Received  uint64 // packets read from the source
	Lost      uint64 // dropped by the random loss draw
	Overflow  uint64 // dropped because the queue was full
	Delivered uint64 // written to the destination
	WriteErrs uint64 // writes the destination refused
}

// pipe is one direction's queue and draws, with time passed in so that
// tests can drive it with a clock of their own. It is not safe for
// concurrent use; Link guards it.
type pipe struct {
	cfg   Direction
	rng   *rand.Rand
	q     packetHeap
	seq   uint64
	stats Stats
}

func newPipe(cfg Direction) *pipe {
	if cfg.Limit == 0 {
		cfg.Limit = DefaultLimit
	}
	return &pipe{cfg: cfg, rng: rand.New(rand.NewPCG(cfg.Seed, 0x6e6574656d75))}
}

// verdict is what push did with a packet.
type verdict int

const (
	queued verdict = iota
	lost
	overflow
)

// push offers a packet that arrived at now. The pipe keeps pkt itself, so
// the caller must not reuse it.
func (p *pipe) push(pkt []byte, now time.Time) verdict {
	p.stats.Received++
	// Draw the loss for every packet, full queue or not, so one packet's
	// fate does not shift the draws of those after it.
	drop := p.cfg.Loss > 0 && p.rng.Float64() < p.cfg.Loss
	delay := p.cfg.Delay
	if p.cfg.Jitter > 0 {
		delay += time.Duration(p.rng.Int64N(int64(2*p.cfg.Jitter)+1)) - p.cfg.Jitter
		delay = max(0, delay)
	}
	switch {
	case drop:
		p.stats.Lost++
		return lost
	case len(p.q) >= p.cfg.Limit:
		p.stats.Overflow++
		return overflow
	}
	p.seq++
	heap.Push(&p.q, held{due: now.Add(delay), seq: p.seq, pkt: pkt})
	return queued
}

// next is the release time of the earliest packet held.
func (p *pipe) next() (time.Time, bool) {
	if len(p.q) == 0 {
		return time.Time{}, false
	}
	return p.q[0].due, true
}

// pop removes and returns the earliest packet if it is due at now.
func (p *pipe) pop(now time.Time) ([]byte, bool) {
	if len(p.q) == 0 || p.q[0].due.After(now) {
		return nil, false
	}
	return heap.Pop(&p.q).(held).pkt, true
}

type held struct {
	due time.Time
	seq uint64 // arrival order, which breaks ties so equal delays keep order
	pkt []byte
}

type packetHeap []held

func (h packetHeap) Len() int { return len(h) }
func (h packetHeap) Less(i, j int) bool {
	if !h[i].due.Equal(h[j].due) {
		return h[i].due.Before(h[j].due)
	}
	return h[i].seq < h[j].seq
}
func (h packetHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *packetHeap) Push(x any)   { *h = append(*h, x.(held)) }
func (h *packetHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	old[len(old)-1] = held{}
	*h = old[:len(old)-1]
	return x
}
