package engine

import (
	"math"
	"slices"
	"testing"
)

func TestGreedy(t *testing.T) {
	s := newSampler(0, 0.5, 1)
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
		s := newSampler(1, 0.95, seed)
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
			s := newSampler(1, tc.topP, 3)
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
		s := newSampler(temp, 1, 11)
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
			s := newSampler(0.8, 0.9, 1)
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
			s := newSampler(tc.temperature, tc.topP, tc.seed)
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
