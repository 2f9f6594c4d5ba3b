package engine

import (
	"math"
	"math/rand/v2"
	"slices"
)

// sampler picks the next token from a row of logits. Temperature 0 is
// greedy (argmax, lowest id on ties); otherwise the logits are divided by
// the temperature, turned into probabilities, cut to the smallest set of
// most likely tokens whose mass reaches topP (nucleus sampling; topP 0 or
// 1 keeps all) and sampled with the sequence's own PRNG, so the same seed
// and prompt give the same text.
type sampler struct {
	temperature float64
	topP        float64
	rng         *rand.Rand
	probs       []float64
	order       []candidate
}

// candidate is a token of the nucleus being sorted; keeping the
// probability next to the id keeps the sort's memory access linear.
type candidate struct {
	p  float64
	id int
}

func newSampler(temperature, topP float32, seed uint64) *sampler {
	p := float64(topP)
	if p <= 0 || p >= 1 {
		p = 1
	}
	return &sampler{
		temperature: float64(temperature),
		topP:        p,
		rng:         rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
	}
}

func (s *sampler) sample(logits []float32) int {
	if s.temperature == 0 {
		return argmax(logits)
	}
	n := len(logits)
	s.probs = s.probs[:0]
	maxL := math.Inf(-1)
	for _, l := range logits {
		maxL = max(maxL, float64(l))
	}
	if math.IsInf(maxL, 0) || math.IsNaN(maxL) {
		return argmax(logits)
	}
	var sum float64
	for _, l := range logits {
		p := math.Exp((float64(l) - maxL) / s.temperature)
		if math.IsNaN(p) {
			p = 0
		}
		s.probs = append(s.probs, p)
		sum += p
	}
	if s.topP == 1 {
		// Every token, in id order.
		r := s.rng.Float64() * sum
		for id, p := range s.probs {
			if r -= p; r < 0 {
				return id
			}
		}
		return n - 1
	}
	// The nucleus is a prefix of the tokens by falling probability, so only
	// tokens above a cut whose mass already reaches topP need sorting; the
	// cut starts high (real distributions are peaked) and drops until it
	// holds enough, at worst to 0, which takes every token.
	target := s.topP * sum
	for cut := 1e-3; ; cut *= 1e-3 {
		s.order = s.order[:0]
		inside := 0.0
		for i, p := range s.probs {
			if p >= cut {
				s.order = append(s.order, candidate{p, i})
				inside += p
			}
		}
		if inside >= target || cut == 0 {
			break
		}
	}
	// Ties broken by id make the order total, so a seed reproduces the
	// same choice whatever the sort algorithm does with equal keys.
	slices.SortFunc(s.order, func(a, b candidate) int {
		switch {
		case a.p > b.p:
			return -1
		case a.p < b.p:
			return 1
		}
		return a.id - b.id
	})
	keep, mass := 0, 0.0
	for keep < len(s.order) {
		mass += s.order[keep].p
		keep++
		if mass >= target {
			break
		}
	}
	// The nucleus, most likely first. Rounding may leave a sliver at the
	// end, which goes to the last token kept.
	r := s.rng.Float64() * mass
	for _, c := range s.order[:keep] {
		if r -= c.p; r < 0 {
			return c.id
		}
	}
	return s.order[keep-1].id
}

func argmax(logits []float32) int {
	best := 0
	for i, l := range logits {
		if l > logits[best] {
			best = i
		}
	}
	return best
}
