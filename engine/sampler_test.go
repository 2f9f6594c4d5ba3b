package engine

import (
	"cmp"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"h3infer/infer"
)

func TestGreedy(t *testing.T) {
	s := newSampler(&infer.Request{Temperature: 0, TopP: 0.5}, nil, 1)
	tests := map[string]struct {
		logits []float32
		want   int
	}{
		"max":         {[]float32{0.1, 3, -2, 2.9}, 1},
		"tie lowest":  {[]float32{1, 5, 5}, 1},
		"negative":    {[]float32{-9, -3, -4}, 1},
		"single":      {[]float32{42}, 0},
		"infinity":    {[]float32{0, float32(math.Inf(1)), 1}, 1},
		"last is max": {[]float32{0, 0, 0, 1}, 3},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := s.sample(tc.logits); got != tc.want {
				t.Errorf("got %d, want %d", got, tc.want)
			}
		})
	}
}

func TestSamplerSeeded(t *testing.T) {
	logits := []float32{1, 1.2, 0.8, 1.1, 0.9, 1.05}
	draw := func(seed uint64) []int {
		s := newSampler(&infer.Request{Temperature: 1, TopP: 0.95}, nil, seed)
		out := make([]int, 50)
		for i := range out {
			out[i] = s.sample(logits)
		}
		return out
	}
	a, b, c := draw(7), draw(7), draw(8)
	same := func(x, y []int) bool {
		for i := range x {
			if x[i] != y[i] {
				return false
			}
		}
		return true
	}
	if !same(a, b) {
		t.Errorf("same seed gave %v and %v", a, b)
	}
	if same(a, c) {
		t.Errorf("seeds 7 and 8 gave the same 50 draws %v", a)
	}
}

func TestTopP(t *testing.T) {
	// Probabilities at temperature 1: about 0.64, 0.24, 0.09, 0.03.
	logits := []float32{3, 2, 1, 0}
	tests := map[string]struct {
		topP    float32
		allowed map[int]bool
	}{
		"tiny keeps only the best":    {0.01, map[int]bool{0: true}},
		"exactly the first mass":      {0.6, map[int]bool{0: true}},
		"just past the first mass":    {0.7, map[int]bool{0: true, 1: true}},
		"zero means no cut":           {0, map[int]bool{0: true, 1: true, 2: true, 3: true}},
		"one means no cut":            {1, map[int]bool{0: true, 1: true, 2: true, 3: true}},
		"nearly all keeps all tokens": {0.999, map[int]bool{0: true, 1: true, 2: true, 3: true}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			s := newSampler(&infer.Request{Temperature: 1, TopP: tc.topP}, nil, 3)
			seen := map[int]int{}
			for range 4000 {
				id := s.sample(logits)
				if !tc.allowed[id] {
					t.Fatalf("sampled %d outside the nucleus %v", id, tc.allowed)
				}
				seen[id]++
			}
			// Every kept token has probability >= 0.03: 4000 draws miss it
			// with probability below 1e-50.
			for id := range tc.allowed {
				if seen[id] == 0 {
					t.Errorf("token %d of the nucleus never drawn: %v", id, seen)
				}
			}
		})
	}
}

func TestTemperatureSharpens(t *testing.T) {
	logits := []float32{2, 1}
	count := func(temp float32) int {
		s := newSampler(&infer.Request{Temperature: temp, TopP: 1}, nil, 11)
		n := 0
		for range 2000 {
			if s.sample(logits) == 0 {
				n++
			}
		}
		return n
	}
	// p(0) is 0.73 at T=1 and 0.9999 at T=0.1; far apart for 2000 draws.
	cold, warm := count(0.1), count(1)
	if cold < 1990 || warm > 1600 || warm < 1300 {
		t.Errorf("token 0 drawn %d/2000 at T=0.1 and %d/2000 at T=1", cold, warm)
	}
}

func BenchmarkSampleTopP(b *testing.B) {
	shapes := map[string]func(i int) float64{
		// Zipf-like, as language models' next-token distributions are.
		"peaked": func(i int) float64 { return -1.5 * math.Log(float64(1+(i*7919)%32000)) },
		// The worst case: nearly uniform, so the whole vocabulary is sorted.
		"flat": func(i int) float64 { return math.Sin(float64(i)) },
	}
	for name, shape := range shapes {
		b.Run(name, func(b *testing.B) {
			logits := make([]float32, 32000)
			for i := range logits {
				logits[i] = float32(shape(i))
			}
			s := newSampler(&infer.Request{Temperature: 0.8, TopP: 0.9}, nil, 1)
			for b.Loop() {
				s.sample(logits)
			}
		})
	}
}

// The draws a seed gave before top_k, min_p, the penalties and logit_bias
// existed: a request that sets none of them must sample exactly as it did,
// so that a seed keeps its text across versions.
func TestSamplerDrawsUnchanged(t *testing.T) {
	peaked := make([]float32, 1000)
	flat := make([]float32, 1000)
	for i := range peaked {
		peaked[i] = float32(-1.5 * math.Log(float64(1+(i*7919)%1000)))
		flat[i] = float32(math.Sin(float64(i)))
	}
	tests := map[string]struct {
		logits      []float32
		temperature float32
		topP        float32
		seed        uint64
		want        []int
	}{
		"peaked nucleus":    {peaked, 0.8, 0.9, 1, []int{0, 74, 679, 0, 0, 0, 679, 0, 753, 0, 0, 0, 0, 37, 679, 395, 0, 0, 0, 0, 0, 0, 0, 0}},
		"peaked all":        {peaked, 1, 0, 2, []int{679, 358, 358, 0, 216, 0, 580, 0, 716, 0, 0, 0, 679, 0, 37, 419, 0, 0, 0, 864, 407, 679, 0, 716}},
		"peaked hot narrow": {peaked, 1.5, 0.5, 3, []int{358, 580, 358, 0, 358, 0, 111, 679, 679, 358, 358, 74, 0, 395, 148, 74, 827, 148, 111, 753, 753, 864, 679, 0}},
		"flat nucleus":      {flat, 1, 0.95, 4, []int{971, 758, 266, 681, 958, 749, 379, 556, 27, 33, 808, 341, 673, 612, 788, 528, 603, 510, 758, 215, 561, 729, 893, 636}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			s := newSampler(&infer.Request{Temperature: tc.temperature, TopP: tc.topP}, nil, tc.seed)
			got := make([]int, len(tc.want))
			for i := range got {
				got[i] = s.sample(tc.logits)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

// greedyDraws samples n tokens from the same logits at every step, as
// from a model that ignores its input, so that what changes from step to
// step is the penalties' count of the completion.
func greedyDraws(s *sampler, logits []float32, n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = s.sample(logits)
	}
	return out
}

func TestLogitBias(t *testing.T) {
	logits := []float32{3, 1, 2}
	tests := map[string]struct {
		bias []infer.LogitBias
		want int
	}{
		"raises a token to the top": {[]infer.LogitBias{{Token: 1, Bias: 2.5}}, 1},
		"lowers the top":            {[]infer.LogitBias{{Token: 0, Bias: -1.5}}, 2},
		"several tokens":            {[]infer.LogitBias{{Token: 0, Bias: -100}, {Token: 2, Bias: -100}}, 1},
		"a tie goes to the lowest":  {[]infer.LogitBias{{Token: 2, Bias: 1}}, 0},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			s := newSampler(&infer.Request{LogitBias: tc.bias}, nil, 1)
			if got := greedyDraws(s, logits, 3); !slices.Equal(got, []int{tc.want, tc.want, tc.want}) {
				t.Errorf("got %v, want %d every time", got, tc.want)
			}
			if !slices.Equal(logits, []float32{3, 1, 2}) {
				t.Errorf("the model's logits became %v", logits)
			}
		})
	}
	// A large bias decides at any temperature and seed.
	for seed := range uint64(200) {
		s := newSampler(&infer.Request{Temperature: 1.5, LogitBias: []infer.LogitBias{{Token: 1, Bias: 100}}}, nil, seed)
		if got := s.sample(logits); got != 1 {
			t.Fatalf("seed %d: sampled %d, want the biased token 1", seed, got)
		}
	}
}

func TestPresenceAndFrequencyPenalties(t *testing.T) {
	tests := map[string]struct {
		s      infer.Request
		logits []float32
		want   []int
	}{
		// Token 0 leads by 2 and loses 0.5 each time it is chosen: it
		// stays on top for five tokens (the fifth a tie, which the lower
		// id wins) and gives way on the sixth; then the two alternate as
		// their counts pass each other.
		"frequency": {infer.Request{FrequencyPenalty: 0.5}, []float32{4, 2}, []int{0, 0, 0, 0, 0, 1, 0, 1, 0, 1}},
		// 1.5 against a lead of 1: token 1 once, then token 0 for good,
		// since each token pays the presence penalty once however often
		// it appears.
		"presence": {infer.Request{PresencePenalty: 1.5}, []float32{4, 3}, []int{0, 1, 0, 0, 0, 0, 0, 0}},
		// 4-0.25c-0.5 against 3-0.25c-0.5: both add up per token.
		"both": {infer.Request{PresencePenalty: 0.5, FrequencyPenalty: 0.25}, []float32{4, 3}, []int{0, 0, 0, 1, 0, 0, 0, 1}},
		// A negative penalty rewards repeating.
		"negative frequency": {infer.Request{FrequencyPenalty: -1}, []float32{3, 4}, []int{1, 1, 1, 1}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			// The prompt holds both tokens: only the completion counts.
			s := newSampler(&tc.s, []int{0, 1, 1}, 1)
			if got := greedyDraws(s, tc.logits, len(tc.want)); !slices.Equal(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestRepetitionPenalty(t *testing.T) {
	logits := []float32{5, -1, 4.5, 3, -2}
	// Tokens 1 and 3 are the prompt's.
	s := newSampler(&infer.Request{RepetitionPenalty: 2}, []int{3, 1, 3}, 1)
	if got, want := s.pen.apply(logits), []float32{5, -2, 4.5, 1.5, -2}; !slices.Equal(got, want) {
		t.Errorf("before the completion: got %v, want %v", got, want)
	}
	// Token 0 is sampled and halves; then token 2, which halves too and
	// leaves 0 ahead for good: the penalty applies once per token, however
	// often it appears.
	if got, want := greedyDraws(s, logits, 5), []int{0, 2, 0, 0, 0}; !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	if got, want := s.pen.apply(logits), []float32{2.5, -2, 2.25, 1.5, -2}; !slices.Equal(got, want) {
		t.Errorf("after the completion: got %v, want %v", got, want)
	}
	if !slices.Equal(logits, []float32{5, -1, 4.5, 3, -2}) {
		t.Errorf("the model's logits became %v", logits)
	}
}

// The steps apply in the order infer.Request gives, each to the result of
// the one before.
func TestPenaltyOrder(t *testing.T) {
	s := newSampler(&infer.Request{
		LogitBias:         []infer.LogitBias{{Token: 0, Bias: 2}},
		RepetitionPenalty: 2,
		PresencePenalty:   0.5,
		FrequencyPenalty:  1,
	}, []int{0}, 1)
	logits := []float32{-1, 3, 0.25}
	if got := s.sample(logits); got != 1 {
		t.Fatalf("first token %d, want 1", got)
	}
	// Token 0: bias, then repetition: (-1+2)/2, not -1*2+2. Token 1:
	// repetition, then presence and frequency: 3/2-1.5, not (3-1.5)/2.
	if got, want := s.pen.apply(logits), []float32{0.5, 0, 0.25}; !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

// drawn counts the tokens s samples from logits, four draws for each of
// the seeds 0 to seeds-1.
func drawn(s infer.Request, logits []float32, seeds uint64) map[int]int {
	seen := map[int]int{}
	for seed := range seeds {
		smp := newSampler(&s, nil, seed)
		for range 4 {
			seen[smp.sample(logits)]++
		}
	}
	return seen
}

func TestCuts(t *testing.T) {
	// Probabilities relative to the most likely token, at temperature 1.
	rel := func(ps ...float64) []float32 {
		out := make([]float32, len(ps))
		for i, p := range ps {
			out[i] = float32(math.Log(p))
		}
		return out
	}
	minP := rel(0.45, 1, 0.1, 0.55, 0.6)
	// About 0.64, 0.24, 0.09, 0.03, as in TestTopP.
	falling := []float32{3, 2, 1, 0}
	tests := map[string]struct {
		s      infer.Request
		logits []float32
		want   []int
	}{
		"top_k 1":                        {infer.Request{Temperature: 1, TopK: 1}, falling, []int{0}},
		"top_k 2":                        {infer.Request{Temperature: 1, TopK: 2}, rel(0.3, 0.5, 1, 0.2), []int{1, 2}},
		"top_k ties go to the lower ids": {infer.Request{Temperature: 1, TopK: 2}, []float32{1, 2, 2, 2}, []int{1, 2}},
		"top_k the vocabulary":           {infer.Request{Temperature: 1, TopK: 4}, falling, []int{0, 1, 2, 3}},
		"top_k past the vocabulary":      {infer.Request{Temperature: 1, TopK: 1000}, falling, []int{0, 1, 2, 3}},
		"min_p 1 keeps the argmaxes":     {infer.Request{Temperature: 1, MinP: 1}, []float32{1, 3, 3, 2, 2.999}, []int{1, 2}},
		"min_p 0.5":                      {infer.Request{Temperature: 1, MinP: 0.5}, minP, []int{1, 3, 4}},
		// At temperature 2 the relative probabilities are the square
		// roots: 0.67, 1, 0.32, 0.74, 0.77.
		"min_p 0.5 after the temperature": {infer.Request{Temperature: 2, MinP: 0.5}, minP, []int{0, 1, 3, 4}},
		"min_p then top_k":                {infer.Request{Temperature: 1, MinP: 0.5, TopK: 2}, minP, []int{1, 4}},
		// top_p 0.66 alone keeps tokens 0 and 1; of the two that top_k
		// or min_p leave, token 0 alone holds 0.73 of the mass.
		"top_p alone":         {infer.Request{Temperature: 1, TopP: 0.66}, falling, []int{0, 1}},
		"top_k then top_p":    {infer.Request{Temperature: 1, TopK: 2, TopP: 0.66}, falling, []int{0}},
		"min_p then top_p":    {infer.Request{Temperature: 1, MinP: 0.3, TopP: 0.66}, falling, []int{0}},
		"top_k 3 then top_p":  {infer.Request{Temperature: 1, TopK: 3, TopP: 0.7}, falling, []int{0, 1}},
		"all three":           {infer.Request{Temperature: 1, TopK: 3, MinP: 0.1, TopP: 0.99}, falling, []int{0, 1, 2}},
		"greedy ignores cuts": {infer.Request{TopK: 3, MinP: 0.5, TopP: 0.5}, falling, []int{0}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			// Every token kept has a probability of at least 0.09 among
			// those kept: 2000 draws miss one with probability below 1e-80.
			seen := drawn(tc.s, tc.logits, 500)
			got := slices.Sorted(maps.Keys(seen))
			if !slices.Equal(got, tc.want) {
				t.Errorf("drew tokens %v (%v), want exactly %v", got, seen, tc.want)
			}
		})
	}
}

// top_k 1 is greedy decoding whatever the seed, temperature and other
// cuts.
func TestTopKOneIsGreedy(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for seed := range uint64(300) {
		logits := make([]float32, 64)
		for i := range logits {
			logits[i] = float32(rng.NormFloat64() * 2)
		}
		if seed%2 == 0 {
			// Two tokens share the top logit.
			a, b := rng.IntN(64), rng.IntN(64)
			logits[a] = 20
			logits[b] = 20
		}
		want := argmax(logits)
		s := newSampler(&infer.Request{Temperature: 0.2 + float32(seed%7)/2, TopK: 1, TopP: 0.9, MinP: 0.01}, nil, seed)
		if got := s.sample(logits); got != want {
			t.Fatalf("seed %d: sampled %d, want the argmax %d", seed, got, want)
		}
	}
}

// A request without bias or penalties samples the model's own logits and
// allocates nothing per token; with every parameter set, a token the
// sequence has already seen allocates nothing either, nor do the
// sampler's logprobs (the sequence's entry for the token does).
func TestSampleAllocations(t *testing.T) {
	logits := make([]float32, 1000)
	for i := range logits {
		logits[i] = float32(math.Sin(float64(i)))
	}
	plain := newSampler(&infer.Request{Temperature: 0.8, TopP: 0.9}, nil, 1)
	if plain.pen != nil {
		t.Fatal("a request with no bias or penalty got penalties")
	}
	if n := testing.AllocsPerRun(100, func() { plain.sample(logits) }); n != 0 {
		t.Errorf("plain: %v allocations per token", n)
	}
	// Always the same token, which the warm-up run counts first.
	peaked := slices.Clone(logits)
	peaked[7] = 1000
	all := newSampler(&infer.Request{Temperature: 0.8, TopP: 0.9, TopK: 40, MinP: 0.05,
		PresencePenalty: 0.5, FrequencyPenalty: 0.1, RepetitionPenalty: 1.1,
		LogitBias: []infer.LogitBias{{Token: 3, Bias: 1}, {Token: 500, Bias: -2}}}, []int{1, 2, 3}, 1)
	if n := testing.AllocsPerRun(100, func() { all.sample(peaked) }); n != 0 {
		t.Errorf("every parameter: %v allocations per token", n)
	}
	for _, temp := range []float32{0, 0.8} {
		lp := newSampler(&infer.Request{Temperature: temp, TopP: 0.9, Logprobs: true, TopLogprobs: infer.MaxTopLogprobs}, nil, 1)
		if n := testing.AllocsPerRun(100, func() { lp.sample(logits) }); n != 0 {
			t.Errorf("logprobs at temperature %v: %v allocations per token", temp, n)
		}
	}
}

// top_k keeps its k tokens when most of them are far less likely than the
// first, below where the search for them starts.
func TestTopKReachesUnlikelyTokens(t *testing.T) {
	// Token 0 and 2000 tokens each 0.0009 times as likely: the first
	// 1000 of those, ties going to the lower ids, hold 0.47 of the mass
	// that top_k 1001 keeps.
	logits := make([]float32, 2001)
	for i := 1; i < len(logits); i++ {
		logits[i] = float32(math.Log(0.0009))
	}
	seen := drawn(infer.Request{Temperature: 1, TopK: 1001}, logits, 500)
	small := 0
	for id := range seen {
		if id > 1000 {
			t.Fatalf("drew token %d, outside the 1001 most likely", id)
		}
		if id > 0 {
			small++
		}
	}
	if seen[0] == 0 || small < 100 {
		t.Errorf("drew token 0 %d times and %d distinct others, want both many", seen[0], small)
	}
}

// BenchmarkSample is one token of a 32000-token vocabulary with none of
// the parameters beyond temperature and top_p, and with all of them: a
// logit bias on 10 tokens, the penalties over a prompt of 500 distinct
// tokens and a completion of 500 more, and the top_k and min_p cuts;
// each without logprobs, with the chosen token's and with the 20 most
// likely tokens' too.
//
//	go test -run '^$' -bench 'Sample$' ./engine/
func BenchmarkSample(b *testing.B) {
	const vocab = 32000
	shapes := map[string]func(i int) float64{
		"peaked": func(i int) float64 { return -1.5 * math.Log(float64(1+(i*7919)%vocab)) },
		"flat":   func(i int) float64 { return math.Sin(float64(i)) },
	}
	rng := rand.New(rand.NewPCG(1, 1))
	prompt := rng.Perm(vocab)[:500]
	var bias []infer.LogitBias
	for i := range 10 {
		bias = append(bias, infer.LogitBias{Token: uint32(i * 3001), Bias: float32(i%3) - 1})
	}
	for _, shape := range []string{"peaked", "flat"} {
		logits := make([]float32, vocab)
		for i := range logits {
			logits[i] = float32(shapes[shape](i))
		}
		for _, temp := range []float32{0, 0.8} {
			for _, params := range []string{"none", "all"} {
				for _, top := range []int{-1, 0, infer.MaxTopLogprobs} {
					logprobs := "off"
					if top >= 0 {
						logprobs = fmt.Sprint(top)
					}
					b.Run(fmt.Sprintf("shape=%s/temperature=%v/params=%s/logprobs=%s", shape, temp, params, logprobs), func(b *testing.B) {
						s := infer.Request{Temperature: temp, TopP: 0.9}
						if params == "all" {
							s.TopK, s.MinP = 40, 0.05
							s.PresencePenalty, s.FrequencyPenalty, s.RepetitionPenalty = 0.5, 0.3, 1.1
							s.LogitBias = bias
						}
						if top >= 0 {
							s.Logprobs, s.TopLogprobs = true, uint8(top)
						}
						smp := newSampler(&s, prompt, 1)
						if smp.pen != nil {
							for _, id := range rng.Perm(vocab)[:500] {
								smp.pen.add(id)
							}
						}
						for b.Loop() {
							id := smp.sample(logits)
							if smp.pen != nil {
								// Uncounted, so that the completion stays
								// 500 tokens long rather than piling up on
								// the few the fixed logits favour.
								smp.pen.seen[smp.pen.at[id]].count--
							}
						}
					})
				}
			}
		}
	}
}

// selectFirst puts the same k candidates first as a sort does, whatever
// the ties among their probabilities.
func TestSelectFirst(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for trial := range 500 {
		n := 1 + rng.IntN(300)
		c := make([]candidate, n)
		for i, id := range rng.Perm(n) {
			// Few distinct probabilities, so most compare by id.
			c[i] = candidate{p: float64(rng.IntN(1 + trial%20)), id: id}
		}
		if trial%50 == 0 {
			slices.SortFunc(c, func(a, b candidate) int { return cmp.Compare(a.id, b.id) })
		}
		k := 1 + rng.IntN(n)
		sorted := slices.Clone(c)
		slices.SortFunc(sorted, func(a, b candidate) int {
			if before(a, b) {
				return -1
			}
			return 1
		})
		selectFirst(c, k)
		first := slices.Clone(c[:k])
		slices.SortFunc(first, func(a, b candidate) int {
			if before(a, b) {
				return -1
			}
			return 1
		})
		if !slices.Equal(first, sorted[:k]) {
			t.Fatalf("trial %d, k %d of %d: got %v, want %v", trial, k, n, first, sorted[:k])
		}
	}
}

// logSoftmax is the log-softmax of logits, computed the plain way.
func logSoftmax(logits []float32) []float64 {
	var sum float64
	for _, l := range logits {
		sum += math.Exp(float64(l))
	}
	out := make([]float64, len(logits))
	for i, l := range logits {
		out[i] = math.Log(math.Exp(float64(l)) / sum)
	}
	return out
}

// stepOf is the step's logprobs as sample left them: the chosen token's,
// and the top ids and logprobs.
func stepOf(s *sampler) (chosen float64, ids []int, lps []float64) {
	for _, c := range s.lp.best {
		ids = append(ids, c.id)
		lps = append(lps, c.p)
	}
	return s.lp.chosen, ids, lps
}

func TestLogprobs(t *testing.T) {
	logits := []float32{2, 1, 0.5, -1, 3, 3, -4, 0}
	// Most likely first, ties going to the lower id.
	order := []int{4, 5, 0, 1, 2, 7, 3, 6}
	tests := map[string]struct {
		s      infer.Request
		prompt []int
		// adjusted are the logits after the bias and penalties, which
		// the logprobs are the log-softmax of.
		adjusted []float32
	}{
		"greedy":      {infer.Request{}, nil, logits},
		"temperature": {infer.Request{Temperature: 0.3}, nil, logits},
		"hot and cut": {infer.Request{Temperature: 2.5, TopK: 2, MinP: 0.5, TopP: 0.5}, nil, logits},
		"logit_bias": {infer.Request{Temperature: 0.7, LogitBias: []infer.LogitBias{{Token: 3, Bias: 4.5}, {Token: 4, Bias: -1}}}, nil,
			[]float32{2, 1, 0.5, 3.5, 2, 3, -4, 0}},
		// The prompt's tokens 0 and 3: 2/2 and -1*2.
		"repetition_penalty": {infer.Request{RepetitionPenalty: 2}, []int{0, 3, 0}, []float32{1, 1, 0.5, -2, 3, 3, -4, 0}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			tc.s.Logprobs, tc.s.TopLogprobs = true, uint8(len(logits))
			s := newSampler(&tc.s, tc.prompt, 1)
			id := s.sample(logits)
			chosen, ids, lps := stepOf(s)
			want := logSoftmax(tc.adjusted)
			if math.Abs(chosen-want[id]) > 1e-12 {
				t.Errorf("chosen token %d: logprob %v, want %v", id, chosen, want[id])
			}
			wantIDs := make([]int, len(logits))
			for i := range wantIDs {
				wantIDs[i] = i
			}
			slices.SortStableFunc(wantIDs, func(a, b int) int { return cmp.Compare(want[b], want[a]) })
			if !slices.Equal(ids, wantIDs) {
				t.Errorf("top ids %v, want %v", ids, wantIDs)
			}
			var mass float64
			for i, lp := range lps {
				if math.Abs(lp-want[ids[i]]) > 1e-12 {
					t.Errorf("token %d: logprob %v, want %v", ids[i], lp, want[ids[i]])
				}
				mass += math.Exp(float64(float32(lp)))
			}
			if math.Abs(mass-1) > 1e-6 {
				t.Errorf("the probabilities sum to %v", mass)
			}
			if tc.s.Temperature == 0 && (id != ids[0] || chosen != lps[0]) {
				t.Errorf("greedy chose %d at %v, the most likely is %d at %v", id, chosen, ids[0], lps[0])
			}
		})
	}
	// Tokens 4 and 5 share the largest logit: the lower id goes first.
	s := newSampler(&infer.Request{Logprobs: true, TopLogprobs: 8}, nil, 1)
	s.sample(logits)
	if _, ids, _ := stepOf(s); !slices.Equal(ids, order) {
		t.Errorf("top ids %v, want %v", ids, order)
	}
}

// The presence and frequency penalties count the completion: the
// logprobs of each step are those of the logits they left.
func TestLogprobsFollowPenalties(t *testing.T) {
	logits := []float32{4, 2, 0}
	s := newSampler(&infer.Request{PresencePenalty: 0.5, FrequencyPenalty: 1, Logprobs: true, TopLogprobs: 3}, nil, 1)
	for step, adjusted := range [][]float32{{4, 2, 0}, {2.5, 2, 0}, {1.5, 2, 0}} {
		id := s.sample(logits)
		want := logSoftmax(adjusted)
		chosen, ids, lps := stepOf(s)
		if math.Abs(chosen-want[id]) > 1e-12 || ids[0] != id {
			t.Errorf("step %d: chose %d at %v, top %v; want %v for the adjusted logits %v", step, id, chosen, ids, want, adjusted)
		}
		for i, lp := range lps {
			if math.Abs(lp-want[ids[i]]) > 1e-12 {
				t.Errorf("step %d: token %d logprob %v, want %v", step, ids[i], lp, want[ids[i]])
			}
		}
	}
}

// The top tokens are those a full sort of the vocabulary puts first,
// ties going to the lower id, whatever the vocabulary's order; and asking
// for logprobs does not change which tokens are drawn.
func TestLogprobsTopAgreeWithSort(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for trial := range 300 {
		n := 1 + rng.IntN(500)
		logits := make([]float32, n)
		for i := range logits {
			// Few distinct values, so that many tie.
			logits[i] = float32(rng.IntN(1+trial%12)) - 3
		}
		if trial%10 == 0 {
			slices.Sort(logits) // rising: each token is the new maximum
		}
		top := rng.IntN(infer.MaxTopLogprobs + 1)
		req := infer.Request{Temperature: 0.9, TopP: 0.9, Seed: uint64(trial), HasSeed: true}
		plain := newSampler(&req, nil, uint64(trial))
		req.Logprobs, req.TopLogprobs = true, uint8(top)
		s := newSampler(&req, nil, uint64(trial))
		for range 3 {
			if a, b := plain.sample(logits), s.sample(logits); a != b {
				t.Fatalf("trial %d: drew %d without logprobs, %d with", trial, a, b)
			}
		}
		want := make([]int, n)
		for i := range want {
			want[i] = i
		}
		slices.SortStableFunc(want, func(a, b int) int { return cmp.Compare(logits[b], logits[a]) })
		want = want[:min(top, n)]
		if _, ids, _ := stepOf(s); !slices.Equal(ids, want) && (len(ids) != 0 || len(want) != 0) {
			t.Fatalf("trial %d, top %d of %d: got %v, want %v", trial, top, n, ids, want)
		}
	}
}

// Infinite and NaN logits give logprobs that are numbers or -Inf, with
// all the mass on the largest logits.
func TestLogprobsNonFinite(t *testing.T) {
	inf, nan := float32(math.Inf(1)), float32(math.NaN())
	tests := map[string]struct {
		logits []float32
		want   []float64 // by id
	}{
		"+Inf":       {[]float32{1, inf, 2, inf}, []float64{math.Inf(-1), -math.Ln2, math.Inf(-1), -math.Ln2}},
		"NaN":        {[]float32{0, nan, 0}, []float64{-math.Ln2, math.Inf(-1), -math.Ln2}},
		"all -Inf":   {[]float32{-inf, -inf}, []float64{-math.Ln2, -math.Ln2}},
		"-Inf, NaN":  {[]float32{-inf, nan, -inf, -inf}, []float64{-2 * math.Ln2, -2 * math.Ln2, -2 * math.Ln2, -2 * math.Ln2}},
		"some -Inf":  {[]float32{-inf, 0, -inf}, []float64{math.Inf(-1), 0, math.Inf(-1)}},
		"huge range": {[]float32{-3e38, 3e38}, []float64{math.Inf(-1), 0}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			s := newSampler(&infer.Request{Logprobs: true, TopLogprobs: infer.MaxTopLogprobs}, nil, 1)
			id := s.sample(tc.logits)
			chosen, ids, lps := stepOf(s)
			if len(ids) != len(tc.logits) {
				t.Fatalf("%d top entries of a vocabulary of %d", len(ids), len(tc.logits))
			}
			if float32(chosen) != float32(tc.want[id]) {
				t.Errorf("chosen token %d: %v, want %v", id, chosen, tc.want[id])
			}
			for i, lp := range lps {
				if float32(lp) != float32(tc.want[ids[i]]) {
					t.Errorf("token %d: %v, want %v", ids[i], lp, tc.want[ids[i]])
				}
			}
		})
	}
}

// A token's logprob entry is what a step that asks for them allocates
// beyond one that does not: the entry, and its top entries when asked
// for.
func TestNextLogprobsAllocations(t *testing.T) {
	allocs := func(s infer.Request) float64 {
		t.Helper()
		s.Prompt, s.MaxTokens = "a b", 1000
		q, err := newSequence(newSynthetic("synthetic", 0), &s)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := q.prefill(); err != nil {
			t.Fatal(err)
		}
		return testing.AllocsPerRun(100, func() {
			if _, done := q.next(); done != nil {
				t.Fatal("the sequence ended")
			}
		})
	}
	off := allocs(infer.Request{})
	for _, tc := range []struct {
		s    infer.Request
		more float64
	}{
		{infer.Request{Logprobs: true}, 1},
		{infer.Request{Logprobs: true, TopLogprobs: infer.MaxTopLogprobs}, 2},
		{infer.Request{Temperature: 1, Logprobs: true, TopLogprobs: 1, PresencePenalty: 1}, 2},
	} {
		if got := allocs(tc.s) - off; got != tc.more {
			t.Errorf("%+v: %v allocations more per token than without logprobs, want %v", tc.s, got, tc.more)
		}
	}
}
