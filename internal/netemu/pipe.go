package netemu

import (
	"container/heap"
	"errors"
	"fmt"
	"math"
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
	// Loss is the probability, 0..1, that a packet is dropped: the
	// long-run loss rate.
	Loss float64
	// Burst, when > 1, is the mean length in packets of a run of lost
	// packets: loss follows a two-state (Gilbert) model that loses every
	// packet in its bad state and none in its good one, leaving the bad
	// state with probability 1/Burst per packet and entering it at the
	// rate that keeps the long-run loss at Loss. It starts good. 0 or 1
	// means each packet is lost independently (Bernoulli), whose runs
	// average 1/(1-Loss) packets.
	Burst float64
	// Limit bounds the packets held at once; 0 means DefaultLimit. A
	// packet arriving at a full queue is dropped.
	Limit int
	// Rate, when > 0, is the link's bandwidth in bits per second. Packets
	// are serialized one at a time in arrival order, each taking
	// len*8/Rate from when it arrives or the link frees, whichever is
	// later, and the delay starts when its serialization ends. 0 means
	// unlimited: no serialization time.
	Rate int64
	// RateQueue bounds the packets waiting for the link with Rate set:
	// those accepted whose serialization has not started (the one being
	// serialized does not count). 0 means DefaultRateQueue. A packet
	// arriving when that many wait is dropped. Without Rate it is unused.
	RateQueue int
	// Seed seeds the loss and jitter draws, so a run can be repeated.
	Seed uint64
}

// DefaultLimit is Direction.Limit's default, netem's own default queue.
const DefaultLimit = 1000

// DefaultRateQueue is Direction.RateQueue's default: 64 full-size packets
// are 77 ms at 10 Mbit/s, about one round trip of the benchmark's path, a
// buffer that absorbs a burst without hiding congestion for long.
const DefaultRateQueue = 64

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
	switch {
	case !(d.Burst == 0 || d.Burst >= 1) || math.IsInf(d.Burst, 1):
		errs = append(errs, fmt.Errorf("burst: must be 0 or a finite number >= 1, got %v", d.Burst))
	case d.Burst > 1 && d.Loss <= 1 && d.Loss > d.Burst/(d.Burst+1):
		// Above that the good state would have to last under one
		// packet on average: no chain has this loss and this burst.
		errs = append(errs, fmt.Errorf("loss: must be <= burst/(burst+1) = %.4g with burst %v, got %v",
			d.Burst/(d.Burst+1), d.Burst, d.Loss))
	}
	if d.Limit < 0 {
		errs = append(errs, fmt.Errorf("limit: must be >= 0, got %d", d.Limit))
	}
	if d.Rate < 0 {
		errs = append(errs, fmt.Errorf("rate: must be >= 0, got %d", d.Rate))
	}
	if d.RateQueue < 0 {
		errs = append(errs, fmt.Errorf("rate_queue: must be >= 0, got %d", d.RateQueue))
	}
	return errors.Join(errs...)
}

// Stats counts what one direction did with its packets.
type Stats struct {
	Received  uint64 // packets read from the source
	Lost      uint64 // dropped by the random loss draw
	Overflow  uint64 // dropped because the queue or the rate queue was full
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

	// The Gilbert chain, with Burst > 1: its state and per-packet
	// transition probabilities.
	bad                  bool
	goodToBad, badToGood float64

	// The serializing link, with Rate > 0: when it is next free, and
	// the start times, in order, of the packets accepted that had to
	// wait for it, until waiting sees them started.
	linkFree time.Time
	starts   []time.Time
}

func newPipe(cfg Direction) *pipe {
	if cfg.Limit == 0 {
		cfg.Limit = DefaultLimit
	}
	if cfg.RateQueue == 0 {
		cfg.RateQueue = DefaultRateQueue
	}
	p := &pipe{cfg: cfg, rng: rand.New(rand.NewPCG(cfg.Seed, 0x6e6574656d75))}
	if cfg.Burst > 1 {
		p.badToGood = 1 / cfg.Burst
		// The chain is bad goodToBad/(goodToBad+badToGood) of the
		// time, which this makes Loss.
		p.goodToBad = cfg.Loss * p.badToGood / (1 - cfg.Loss)
	}
	return p
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
	drop := p.drawLoss()
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
	case p.cfg.Rate > 0 && p.waiting(now) >= p.cfg.RateQueue:
		p.stats.Overflow++
		return overflow
	}
	sent := now
	if p.cfg.Rate > 0 {
		start := now
		if p.linkFree.After(now) {
			start = p.linkFree
			p.starts = append(p.starts, start)
		}
		p.linkFree = start.Add(serialization(len(pkt), p.cfg.Rate))
		sent = p.linkFree
	}
	p.seq++
	heap.Push(&p.q, held{due: sent.Add(delay), seq: p.seq, pkt: pkt})
	return queued
}

// drawLoss draws one packet's loss, moving the Gilbert chain a step
// when there is one. It takes one draw per packet either way.
func (p *pipe) drawLoss() bool {
	if p.cfg.Loss <= 0 {
		return false
	}
	u := p.rng.Float64()
	switch {
	case p.cfg.Burst <= 1:
		return u < p.cfg.Loss
	case p.bad:
		p.bad = u >= p.badToGood
	default:
		p.bad = u < p.goodToBad
	}
	return p.bad
}

// waiting is how many accepted packets are waiting for the link at now:
// those whose serialization starts after now.
func (p *pipe) waiting(now time.Time) int {
	started := 0
	for started < len(p.starts) && !p.starts[started].After(now) {
		started++
	}
	p.starts = p.starts[started:]
	return len(p.starts)
}

// serialization is how long n bytes take at rate bits per second, rounded
// up so that the link never runs faster than its rate.
func serialization(n int, rate int64) time.Duration {
	ns := int64(n) * 8 * int64(time.Second) // IP packets are under 2^16 bytes: no overflow
	d := ns / rate
	if ns%rate != 0 {
		d++
	}
	return time.Duration(d)
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
