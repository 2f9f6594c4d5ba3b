package engine

import (
	"math"
	"math/bits"
	"math/rand/v2"
	"slices"

	"h3infer/constrain"
	"h3infer/infer"
)

// sampler picks the next token of one sequence from a row of logits, with
// the request's sampling parameters in the order infer.Request gives them.
// The logit bias and the penalties change the logits first (penalties);
// then temperature 0 is greedy (argmax, lowest id on ties), and otherwise
// the logits are divided by the temperature, turned into probabilities,
// cut to the topK most likely tokens, to those at least minP times as
// likely as the most likely one, and to the smallest set of most likely
// tokens whose mass reaches topP of what is left (nucleus sampling), and
// sampled with the sequence's own PRNG, so the same seed and prompt give
// the same text.
type sampler struct {
	temperature float64
	topP        float64 // 1: no nucleus cut
	topK        int     // 0: no cut
	minP        float64 // 0: no cut
	rng         *rand.Rand
	probs       []float64
	order       []candidate
	// pen changes the logits before the temperature; nil when the request
	// sets no bias or penalty, which leaves the model's logits as they are.
	pen *penalties
	// lp holds the latest step's logprobs when the request asks for
	// them; nil otherwise, which leaves a step as it was.
	lp *stepLogprobs
	// format masks the tokens that would break the response_format's
	// document, after the penalties; nil when the request sets none,
	// which leaves a step as it was. masked is the sequence's copy of
	// the logits it masks when no penalty made one.
	format *constrain.Matcher
	masked []float32
	// allowed and ids are the logits of the tokens the mask allows and
	// their ids, rising, when the step samples among those alone.
	allowed []float32
	ids     []int32
}

// candidate is a token of the nucleus being sorted; keeping the
// probability next to the id keeps the sort's memory access linear.
type candidate struct {
	p  float64
	id int
}

// newSampler is the sampler of request r, whose prompt is prompt.
func newSampler(r *infer.Request, prompt []int, seed uint64) *sampler {
	p := float64(r.TopP)
	if p <= 0 || p >= 1 {
		p = 1
	}
	s := &sampler{
		temperature: float64(r.Temperature),
		topP:        p,
		topK:        int(r.TopK),
		minP:        float64(r.MinP),
		rng:         rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		pen:         newPenalties(r, prompt),
	}
	if r.Logprobs {
		s.lp = &stepLogprobs{top: int(r.TopLogprobs), best: make([]candidate, 0, r.TopLogprobs)}
	}
	return s
}

// sample picks the next token from logits, which it does not change: they
// may be a row of a batch's output that other rows share.
func (s *sampler) sample(logits []float32) int {
	if s.pen == nil && s.format == nil {
		id := s.pick(logits, len(logits))
		if s.lp != nil {
			s.lp.record(logits, id)
		}
		return id
	}
	return s.step(logits, len(logits)/sparseShare)
}

// sparseShare sets when a constrained step samples among the allowed
// tokens alone: when the mask allows at most one token in sparseShare.
// Between a document's values it allows tens of tokens, inside a string
// nearly all; gathering those would be the masked copy over again.
const sparseShare = 8

// step is sample for a request with a bias, a penalty or a
// response_format; it takes the sparse path when the mask allows at most
// sparseMax tokens (tests compare it with the dense one, at 0).
func (s *sampler) step(logits []float32, sparseMax int) int {
	l := logits
	if s.pen != nil {
		l = s.pen.apply(logits)
	}
	id, ok := 0, false
	if s.format != nil {
		id, ok = s.pickAllowed(l, s.format.Allowed(), sparseMax)
	}
	if !ok {
		if s.format != nil {
			if s.pen == nil {
				s.masked = append(s.masked[:0], logits...)
				l = s.masked
			}
			applyMask(l, s.format.Allowed())
		}
		id = s.pick(l, len(l))
		if s.lp != nil {
			s.lp.record(l, id)
		}
	}
	if s.pen != nil {
		s.pen.add(id)
	}
	if s.format != nil {
		s.format.Accept(id)
	}
	return id
}

// pickAllowed samples among the tokens mask allows alone, which is what
// the dense path does with the others' logits at -Inf, and records the
// step's logprobs likewise: a masked token's probability is exactly 0,
// and adds exactly nothing to any sum, the allowed tokens keep their
// order by id, which breaks every tie, and pick is told the vocabulary's
// width, which its top_k compares with. The tokens the dense path would
// list among the top logprobs at -Inf, when fewer are allowed than asked
// for, are those the sequence drops. It declines (false) when more than
// limit tokens are allowed, and when an allowed logit is NaN or infinite:
// pick and record have cases of their own for those, which the dense
// path keeps.
func (s *sampler) pickAllowed(l []float32, mask []uint64, limit int) (int, bool) {
	n := 0
	for _, w := range mask {
		n += bits.OnesCount64(w)
	}
	if n == 0 || n > limit {
		return 0, false
	}
	s.allowed, s.ids = s.allowed[:0], s.ids[:0]
	for w, word := range mask {
		for word != 0 {
			id := w*64 + bits.TrailingZeros64(word)
			word &= word - 1
			if id >= len(l) {
				return 0, false
			}
			v := float64(l[id])
			if math.IsNaN(v) || math.IsInf(v, 0) {
				return 0, false
			}
			s.allowed = append(s.allowed, l[id])
			s.ids = append(s.ids, int32(id))
		}
	}
	i := s.pick(s.allowed, len(l))
	if s.lp != nil {
		s.lp.record(s.allowed, i)
		for j := range s.lp.best {
			s.lp.best[j].id = int(s.ids[s.lp.best[j].id])
		}
	}
	return int(s.ids[i]), true
}

// applyMask sets to -Inf the logits of the tokens mask leaves out: bit
// id%64 of word id/64 clear. A word at a time, since a mask is mostly
// all clear (between strings) or all set (inside them).
func applyMask(l []float32, mask []uint64) {
	inf := float32(math.Inf(-1))
	for w, bits := range mask {
		lo := w * 64
		hi := min(lo+64, len(l))
		switch bits {
		case ^uint64(0):
		case 0:
			for i := lo; i < hi; i++ {
				l[i] = inf
			}
		default:
			for i := lo; i < hi; i++ {
				if bits>>(i-lo)&1 == 0 {
					l[i] = inf
				}
			}
		}
	}
}

// pick samples a token from logits, of a vocabulary of width tokens:
// all of it, or the allowed tokens of a constrained step, in the order of
// their ids, whose index in logits it returns.
func (s *sampler) pick(logits []float32, width int) int {
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
	// Probabilities relative to the most likely token's, which is 1.
	var sum float64
	for _, l := range logits {
		p := math.Exp((float64(l) - maxL) / s.temperature)
		if math.IsNaN(p) {
			p = 0
		}
		s.probs = append(s.probs, p)
		sum += p
	}
	k := s.topK
	if k >= width {
		k = 0
	}
	if s.topP == 1 && k == 0 && s.minP == 0 {
		// Every token, in id order.
		r := s.rng.Float64() * sum
		for id, p := range s.probs {
			if r -= p; r < 0 {
				return id
			}
		}
		return n - 1
	}
	// Each cut keeps a prefix of the tokens by falling probability: the
	// minP cut all tokens of at least minP (the most likely one being 1),
	// the topK cut k of those, and the nucleus enough of what remains to
	// reach topP of its mass.
	left := sum
	if s.minP > 0 {
		left = 0
		for _, p := range s.probs {
			if p >= s.minP {
				left += p
			}
		}
	}
	target := s.topP * left
	// Only tokens above a cut that holds every token kept need sorting;
	// the cut starts high (real distributions are peaked) and drops until
	// it holds enough, at worst to minP or 0, which takes every token the
	// minP cut leaves. Without topK, enough is the nucleus's mass; with
	// it, k tokens, or every token with any mass.
	for cut := 1e-3; ; cut *= 1e-3 {
		cut = max(cut, s.minP)
		s.order = s.order[:0]
		inside := 0.0
		for i, p := range s.probs {
			if p >= cut {
				s.order = append(s.order, candidate{p, i})
				inside += p
			}
		}
		if cut == s.minP || k == 0 && inside >= target || k > 0 && (len(s.order) >= k || inside >= left) {
			break
		}
	}
	if k > 0 && len(s.order) > k {
		// A flat distribution puts most of the vocabulary above the
		// cut; only the k first need sorting.
		selectFirst(s.order, k)
		s.order = s.order[:k]
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
	if k > 0 {
		left = 0
		for _, c := range s.order {
			left += c.p
		}
		target = s.topP * left
	}
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

// before is the order candidates are sorted in: falling probability,
// then rising id.
func before(a, b candidate) bool { return a.p > b.p || a.p == b.p && a.id < b.id }

// selectFirst moves the k first candidates of c, in the order of before,
// to c[:k], in no particular order (quickselect).
func selectFirst(c []candidate, k int) {
	lo, hi := 0, len(c)-1
	for lo < hi {
		// The median of three, so that sorted input takes linear time.
		mid := lo + (hi-lo)/2
		if before(c[mid], c[lo]) {
			c[mid], c[lo] = c[lo], c[mid]
		}
		if before(c[hi], c[lo]) {
			c[hi], c[lo] = c[lo], c[hi]
		}
		if before(c[hi], c[mid]) {
			c[hi], c[mid] = c[mid], c[hi]
		}
		pivot := c[mid]
		i, j := lo, hi
		for i <= j {
			for before(c[i], pivot) {
				i++
			}
			for before(pivot, c[j]) {
				j--
			}
			if i <= j {
				c[i], c[j] = c[j], c[i]
				i++
				j--
			}
		}
		// Now c[lo:j+1] come no later than the pivot and c[i:hi+1] no
		// earlier; between them is the pivot itself.
		switch {
		case k-1 <= j:
			hi = j
		case k-1 >= i:
			lo = i
		default:
			return
		}
	}
}

// stepLogprobs are the log-softmax of one step's logits as pick gets
// them, after the bias and the penalties and before the temperature and
// the cuts (infer.Request.Logprobs): the chosen token's, and those of the
// top most likely tokens.
type stepLogprobs struct {
	top    int
	chosen float64
	// best are the top most likely tokens (fewer in a smaller
	// vocabulary), p their logprobs: most likely first, ties going to
	// the lower id, once record returns; a heap with the least likely at
	// its root while it runs.
	best []candidate
}

// record computes the logprobs of the step whose logits are logits and
// whose chosen token is id: a max-subtracted logsumexp in float64, whose
// maximum moves as the pass finds larger logits, in the same single pass
// as the selection of the top tokens. A NaN logit counts as -Inf.
func (lp *stepLogprobs) record(logits []float32, id int) {
	lp.best = lp.best[:0]
	top := min(lp.top, len(logits))
	m, sum := math.Inf(-1), 0.0 // sum is of exp(logit - m)
	for i, l := range logits {
		v := float64(l)
		switch {
		case v > m:
			sum = sum*math.Exp(m-v) + 1
			m = v
		case v > math.Inf(-1):
			sum += math.Exp(v - m)
		default:
			v = math.Inf(-1)
		}
		if len(lp.best) < top {
			lp.best = append(lp.best, candidate{v, i})
			lp.up(len(lp.best) - 1)
		} else if top > 0 && v > lp.best[0].p {
			// Ids only grow, so a token as likely as the root comes
			// after it: only a more likely one takes its place.
			lp.best[0] = candidate{v, i}
			lp.down(0)
		}
	}
	logSum := math.Log(sum)
	logprob := func(v float64) float64 { return v - m - logSum }
	if math.IsInf(m, 0) {
		// Infinite logits leave no finite differences: the tokens
		// holding the largest share the whole mass, as equal logits
		// would (and so does every token when none is above -Inf).
		n := 0
		for _, l := range logits {
			if v := float64(l); v == m || math.IsNaN(v) && math.IsInf(m, -1) {
				n++
			}
		}
		share := -math.Log(float64(n))
		logprob = func(v float64) float64 {
			if v == m {
				return share
			}
			return math.Inf(-1)
		}
	}
	chosen := float64(logits[id])
	if math.IsNaN(chosen) {
		chosen = math.Inf(-1)
	}
	lp.chosen = logprob(chosen)
	slices.SortFunc(lp.best, func(a, b candidate) int {
		if before(a, b) {
			return -1
		}
		return 1
	})
	for i := range lp.best {
		lp.best[i].p = logprob(lp.best[i].p)
	}
}

// up and down restore the heap of best, whose root is the least likely
// token (the last in the order of before), after best[i] changed.
func (lp *stepLogprobs) up(i int) {
	h := lp.best
	for i > 0 {
		parent := (i - 1) / 2
		if !before(h[parent], h[i]) {
			return
		}
		h[parent], h[i] = h[i], h[parent]
		i = parent
	}
}

func (lp *stepLogprobs) down(i int) {
	h := lp.best
	for {
		worst, l, r := i, 2*i+1, 2*i+2
		if l < len(h) && before(h[worst], h[l]) {
			worst = l
		}
		if r < len(h) && before(h[worst], h[r]) {
			worst = r
		}
		if worst == i {
			return
		}
		h[i], h[worst] = h[worst], h[i]
		i = worst
	}
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

// penalties are one sequence's logit bias and repetition, presence and
// frequency penalties, with the tokens they count. They change a copy of
// the model's logits, the sequence's own, since a step's logits are one
// buffer for the whole batch.
type penalties struct {
	bias       []infer.LogitBias
	repetition float32 // 1: off
	presence   float32
	frequency  float32
	// seen holds, once each, the tokens a penalty applies to: the
	// prompt's when the repetition penalty is on, then the completion's
	// as they are sampled; at indexes it by token id. Both grow with the
	// sequence's distinct tokens only. Nil when only the bias is set.
	seen   []seenToken
	at     map[int]int
	logits []float32
}

type seenToken struct {
	id    int
	count int // in the completion
}

// newPenalties returns nil when r sets no bias and no penalty.
func newPenalties(r *infer.Request, prompt []int) *penalties {
	rep := r.RepetitionPenalty
	if rep == 0 {
		rep = 1
	}
	if len(r.LogitBias) == 0 && rep == 1 && r.PresencePenalty == 0 && r.FrequencyPenalty == 0 {
		return nil
	}
	p := &penalties{bias: r.LogitBias, repetition: rep, presence: r.PresencePenalty, frequency: r.FrequencyPenalty}
	if rep == 1 && p.presence == 0 && p.frequency == 0 {
		return p
	}
	p.at = map[int]int{}
	if rep != 1 {
		for _, id := range prompt {
			if _, ok := p.at[id]; !ok {
				p.at[id] = len(p.seen)
				p.seen = append(p.seen, seenToken{id: id})
			}
		}
	}
	return p
}

// apply returns the sequence's copy of logits with the bias and the
// penalties applied, in the order infer.Request gives.
func (p *penalties) apply(logits []float32) []float32 {
	p.logits = append(p.logits[:0], logits...)
	l := p.logits
	// The bias's tokens were checked against the vocabulary at prefill.
	for _, b := range p.bias {
		l[b.Token] += b.Bias
	}
	for _, t := range p.seen {
		if t.id < 0 || t.id >= len(l) {
			continue // a prompt token past the model's logits, as a tokenizer's added tokens can be
		}
		v := l[t.id]
		if p.repetition != 1 {
			if v > 0 {
				v /= p.repetition
			} else {
				v *= p.repetition
			}
		}
		if t.count > 0 {
			v -= p.frequency*float32(t.count) + p.presence
		}
		l[t.id] = v
	}
	return l
}

// add counts a sampled token of the completion.
func (p *penalties) add(id int) {
	if p.at == nil {
		return
	}
	if i, ok := p.at[id]; ok {
		p.seen[i].count++
		return
	}
	p.at[id] = len(p.seen)
	p.seen = append(p.seen, seenToken{id: id, count: 1})
}
