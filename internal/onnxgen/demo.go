package onnxgen

import (
	_ "embed"
	"fmt"
	"math"
	"slices"
	"strings"
)

// corpus is the text whose character statistics the demo model carries.
//
//go:embed corpus.txt
var corpus string

// The demo model is a character n-gram model written as transformer weights.
//
// Residual stream layout (demoHidden dims):
//
//	[0]                   a constant demoBias, present in every embedding
//	[1+7k .. 7+7k]        the ±1 code of the token k positions back, k = 0..8
//	[demoLogitBase ..]    one dim per token the corpus can produce next
//
// A code is the bit pattern of the token's rank among the corpus bytes, or
// of 0 for any other token, so no context holding a foreign token matches.
// Every embedding has the same norm and attention only copies fixed-norm
// codes, so each RMSNorm before a projection divides by a known constant
// that the weights undo. The constant dominates the norm, which keeps the
// final RMSNorm nearly constant too, so logits come out as log-probabilities.
//
// Attention: each head attends to one fixed relative offset. Queries and keys
// are built from the constant dim and rotated by the rotary tables, whose
// pair i turns by pi/2^i per position. The score of a key delta positions
// back is A·sum_i cos(pi·(delta-k)/2^i), which is maximal at delta = k and at
// least 2A lower anywhere else within the context (take the pair at which
// delta-k first stops being a multiple of the period). Layer 0's heads copy
// the tokens 1 and 2 back; layer 1's heads copy three slots each from layer
// 0's output 3 and 6 back, i.e. the tokens 3..8 back. So the context the
// output depends on reaches it through both layers' KV caches.
//
// MLP (layer 1): one ReLU unit per kept context of 1..9 characters. A unit
// sums the agreement of each slot with its context's codes minus (7m-1), so
// it outputs exactly 1 on a match and 0 otherwise. The units of all matching
// suffixes fire together; each writes the difference between its context's
// smoothed log-probabilities and those of its longest kept shorter suffix, so
// the sum telescopes to the log-probabilities of the longest match (back-off).
//
// The top order remembers only the most recent continuation of each context
// instead of the most frequent one. Greedy decoding then walks forward
// through the text, splicing at repeated 9-grams, and ends with
// <|endoftext|> where the text ends, instead of looping on a common phrase.
const (
	demoLayers     = 2
	demoHeads      = 2
	demoHidden     = 128
	demoHeadDim    = demoHidden / demoHeads
	demoOrder      = 9 // characters of context, the current one included
	demoCodeBits   = 7 // codes for up to 127 distinct corpus bytes
	demoLogitBase  = 1 + demoOrder*demoCodeBits
	demoBias       = 1000.0
	demoScoreGap   = 40.0 // nats between the wanted key and any other, at most
	demoScoreRange = 86.0 // nats between the highest and lowest score, at most
	demoPruneTV    = 0.4  // keep a context that moves this much probability
	demoUnseen     = -20.0
	demoVocab      = 257
	endOfText      = 256
)

// demoHead says what head h of a layer copies: the slots [0, width) of the
// key offset positions back, into slots [offset, offset+width).
func demoHead(layer, head int) (offset, width int) {
	if layer == 0 {
		return 1 + head, 1
	}
	return 3 + 3*head, 3
}

// ngramStats holds smoothed next-token log-probabilities per context.
type ngramStats struct {
	alphabet []int                // tokens the corpus produces, ascending
	index    map[int]int          // token -> position in alphabet
	base     []float64            // order-0 log-probs over alphabet
	logp     map[string][]float64 // context (oldest byte first) -> log-probs
}

// corpusTokens normalises whitespace runs to one space, so paragraphs read as
// one stream, and ends the text with the end-of-text token.
func corpusTokens(text string) []int {
	words := strings.Fields(text)
	joined := strings.Join(words, " ")
	toks := make([]int, 0, len(joined)+1)
	for i := 0; i < len(joined); i++ {
		toks = append(toks, int(joined[i]))
	}
	return append(toks, endOfText)
}

// countNgrams computes interpolated (Witten-Bell) estimates for every
// context of 1..demoOrder tokens seen in the corpus; at the top order the
// counts are replaced by the context's last continuation (see above).
func countNgrams(toks []int) *ngramStats {
	st := &ngramStats{index: map[int]int{}, logp: map[string][]float64{}}
	unigram := map[int]int{}
	for _, t := range toks[1:] {
		unigram[t]++
	}
	for t := range unigram {
		st.alphabet = append(st.alphabet, t)
	}
	slices.Sort(st.alphabet)
	for i, t := range st.alphabet {
		st.index[t] = i
	}
	a := len(st.alphabet)
	n := float64(len(toks) - 1)
	prob := make(map[string][]float64)
	base := make([]float64, a)
	for i, t := range st.alphabet {
		base[i] = (float64(unigram[t]) + 0.5) / (n + 0.5*float64(a))
	}
	st.base = logs(base)

	counts := map[string][]float64{}
	last := map[string]int{}
	for i := 1; i < len(toks); i++ {
		for m := 1; m <= demoOrder && m <= i; m++ {
			ctx := contextKey(toks[i-m : i])
			c, ok := counts[ctx]
			if !ok {
				c = make([]float64, a)
				counts[ctx] = c
			}
			c[st.index[toks[i]]]++
			last[ctx] = st.index[toks[i]]
		}
	}
	for m := 1; m <= demoOrder; m++ {
		for _, ctx := range sortedKeys(counts) {
			if len(ctx) != m {
				continue
			}
			lower := base
			if m > 1 {
				lower = prob[ctx[1:]]
			}
			c := counts[ctx]
			total, distinct := 0.0, 0.0
			for _, v := range c {
				total += v
				if v > 0 {
					distinct++
				}
			}
			lambda := total / (total + distinct)
			p := make([]float64, a)
			for j := range p {
				seen := c[j] / total
				if m == demoOrder {
					seen = 0
					if j == last[ctx] {
						seen = 1
					}
				}
				p[j] = lambda*seen + (1-lambda)*lower[j]
			}
			prob[ctx] = p
			st.logp[ctx] = logs(p)
		}
	}
	return st
}

// contextKey encodes a context of byte tokens, oldest first. Contexts never
// hold the end-of-text token: it only ends the corpus.
func contextKey(toks []int) string {
	b := make([]byte, len(toks))
	for i, t := range toks {
		b[i] = byte(t)
	}
	return string(b)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func logs(p []float64) []float64 {
	l := make([]float64, len(p))
	for i, v := range p {
		l[i] = math.Log(v)
	}
	return l
}

// demoUnit is one MLP unit: the context it detects and what it adds to the
// logit dims when it fires.
type demoUnit struct {
	ctx   string
	delta []float64
}

// pruneContexts keeps the contexts that change the prediction of their
// longest kept suffix: a different argmax, or more than demoPruneTV of
// probability moved (total variation). Shorter contexts are decided first,
// so each unit's delta is relative to the unit that fires just below it.
func pruneContexts(st *ngramStats) []demoUnit {
	kept := map[string][]float64{}
	var units []demoUnit
	for m := 1; m <= demoOrder; m++ {
		for _, ctx := range sortedKeys(st.logp) {
			if len(ctx) != m {
				continue
			}
			lower := st.base
			for s := 1; s < m; s++ {
				if l, ok := kept[ctx[s:]]; ok {
					lower = l
					break
				}
			}
			lp := st.logp[ctx]
			delta := make([]float64, len(lp))
			tv := 0.0
			for i := range lp {
				delta[i] = lp[i] - lower[i]
				tv += math.Abs(math.Exp(lp[i])-math.Exp(lower[i])) / 2
			}
			if argmax(lp) != argmax(lower) || tv > demoPruneTV {
				kept[ctx] = lp
				units = append(units, demoUnit{ctx: ctx, delta: delta})
			}
		}
	}
	return units
}

func argmax(v []float64) int {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return best
}

// tokenCode is the ±1 bit pattern of rank; two different ranks agree on at
// most demoCodeBits-2 of the dot product.
func tokenCode(rank int) [demoCodeBits]float32 {
	var c [demoCodeBits]float32
	for b := range c {
		c[b] = -1
		if rank>>b&1 == 1 {
			c[b] = 1
		}
	}
	return c
}

// codeRanks numbers the bytes that occur in the corpus from 1; every other
// token keeps rank 0.
func codeRanks(toks []int) (map[int]int, error) {
	var seen [256]bool
	for _, t := range toks {
		if t < 256 {
			seen[t] = true
		}
	}
	ranks := map[int]int{}
	for b, ok := range seen {
		if ok {
			ranks[b] = len(ranks) + 1
		}
	}
	if len(ranks) >= 1<<demoCodeBits {
		return nil, fmt.Errorf("corpus uses %d distinct bytes, codes have room for %d", len(ranks), 1<<demoCodeBits-1)
	}
	return ranks, nil
}

// demoShape is the fixed architecture of the demo model at a context length.
// vocab exceeds demoVocab only by tokens the demo treats as unknown.
func demoShape(context, units, vocab int) shape {
	return shape{
		vocab:   vocab,
		layers:  demoLayers,
		heads:   demoHeads,
		hidden:  demoHidden,
		headDim: demoHeadDim,
		mlp:     units,
		context: context,
	}
}

// demoWeights builds the n-gram transformer of text for the given context
// length and vocabulary size (at least demoVocab).
func demoWeights(context int, text string, vocab int) (shape, *weights, error) {
	toks := corpusTokens(text)
	ranks, err := codeRanks(toks)
	if err != nil {
		return shape{}, nil, err
	}
	st := countNgrams(toks)
	if demoLogitBase+len(st.alphabet) > demoHidden {
		return shape{}, nil, fmt.Errorf("corpus uses %d distinct tokens, the demo has room for %d",
			len(st.alphabet), demoHidden-demoLogitBase)
	}
	// The rotary pair with the longest period must span the whole context.
	pairs := 1
	for 1<<pairs < context {
		pairs++
	}
	if pairs > demoHeadDim/2 {
		return shape{}, nil, fmt.Errorf("context %d needs %d rotary pairs, the demo has %d", context, pairs, demoHeadDim/2)
	}
	units := pruneContexts(st)
	s := demoShape(context, len(units), vocab)
	w := newWeights(s)

	freqs := make([]float64, demoHeadDim/2)
	for i := range freqs {
		freqs[i] = math.Pi / math.Exp2(float64(i))
	}
	w.setRotary(s, freqs)

	for t := 0; t < vocab; t++ {
		row := w.embed[t*demoHidden:]
		row[0] = demoBias
		for b, c := range tokenCode(ranks[t]) {
			row[1+b] = c
		}
	}

	// normScale is what RMSNorm multiplies by when the stream holds the bias
	// and `slots` token codes.
	normScale := func(slots int) float64 {
		sq := demoBias*demoBias + float64(slots*demoCodeBits)
		return 1 / math.Sqrt(sq/demoHidden+rmsEps)
	}
	// Per-pair score amplitude A: the wanted key wins by 2A. Scores span
	// 2A·pairs; keeping that under float32's exp underflow (~87) keeps the
	// softmax free of denormal probabilities, which cost ORT's CPU kernels
	// about as much as the rest of the step. At 2048 positions A is 3.9 and
	// the leaked attention weight stays below 1e-3.
	perPair := min(demoScoreGap/2, demoScoreRange/(2*float64(pairs)))
	amp := perPair * math.Sqrt(demoHeadDim) // undoes the graph's 1/sqrt(head_dim)
	filled := 1
	for l := range demoLayers {
		lw := &w.layers[l]
		scale := normScale(filled)
		bias := demoBias * scale // the constant dim after RMSNorm
		for h := range demoHeads {
			k, width := demoHead(l, h)
			col := h * demoHeadDim
			for i := 0; i < pairs; i++ {
				lw.wq[col+i] = float32(amp / bias)
				lw.wk[col+i] = float32(math.Cos(freqs[i]*float64(k)) / bias)
				lw.wk[col+i+demoHeadDim/2] = float32(math.Sin(freqs[i]*float64(k)) / bias)
			}
			// The value holds the key position's first `width` slots; the
			// output writes them `k` slots further back.
			for b := 0; b < width*demoCodeBits; b++ {
				lw.wv[(1+b)*demoHidden+col+b] = float32(1 / scale)
				lw.wo[(col+b)*demoHidden+1+k*demoCodeBits+b] = 1
			}
			filled += width
		}
	}

	// Layer 0 needs no MLP; a single dead unit keeps the block's shape
	// without carrying a zero matrix as wide as layer 1's.
	w.layers[0].w1 = make([]float32, demoHidden)
	w.layers[0].b1 = make([]float32, 1)
	w.layers[0].w2 = make([]float32, demoHidden)
	mlp := &w.layers[demoLayers-1]
	s1 := normScale(demoOrder)
	for j, u := range units {
		m := len(u.ctx)
		for k := 0; k < m; k++ {
			code := tokenCode(ranks[int(u.ctx[m-1-k])]) // slot k holds the token k back
			for b, c := range code {
				mlp.w1[(1+k*demoCodeBits+b)*s.mlp+j] = float32(float64(c) / s1)
			}
		}
		mlp.b1[j] = float32(-(demoCodeBits*m - 1))
		for i, d := range u.delta {
			mlp.w2[j*demoHidden+demoLogitBase+i] = float32(d)
		}
	}

	// lm_head: the bias dim carries order-0 log-probs (and a low floor for
	// tokens the corpus never produces); logit dims map to their tokens.
	sf := normScale(demoOrder)
	for v := 0; v < vocab; v++ {
		lp := demoUnseen
		if i, ok := st.index[v]; ok {
			lp = st.base[i]
			w.lmHead[(demoLogitBase+i)*vocab+v] = float32(1 / sf)
		}
		w.lmHead[v] = float32(lp / (demoBias * sf))
	}
	return s, w, nil
}
