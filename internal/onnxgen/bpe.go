package onnxgen

import (
	"strings"
	"unicode"
)

// learnMerges learns up to n byte-level BPE merges from text, the way BPE
// tokenizers are trained: split the text into words, spell each word in the
// byte alphabet, then repeatedly merge the most frequent adjacent pair of
// symbols (the smallest pair at a tie, so the result is reproducible). It
// stops early when no pair occurs twice. It returns the merges in rank order
// and the new symbols they create, each once, in order of creation.
func learnMerges(text string, n int) (merges [][2]string, symbols []string) {
	freq := map[string]int{}
	var order []string
	for _, w := range trainingWords(text) {
		if freq[w] == 0 {
			order = append(order, w)
		}
		freq[w]++
	}
	words := make([][]string, len(order))
	counts := make([]int, len(order))
	for i, w := range order {
		for j := 0; j < len(w); j++ {
			words[i] = append(words[i], string(ByteToUnicode(w[j])))
		}
		counts[i] = freq[w]
	}
	known := map[string]bool{}
	for len(merges) < n {
		pairs := map[[2]string]int{}
		for i, syms := range words {
			for j := 0; j+1 < len(syms); j++ {
				pairs[[2]string{syms[j], syms[j+1]}] += counts[i]
			}
		}
		best, bestCount := [2]string{}, 1
		for p, c := range pairs {
			if c > bestCount || (c == bestCount && c > 1 && less(p, best)) {
				best, bestCount = p, c
			}
		}
		if bestCount < 2 {
			break
		}
		merges = append(merges, best)
		joined := best[0] + best[1]
		if !known[joined] {
			known[joined] = true
			symbols = append(symbols, joined)
		}
		for i, syms := range words {
			out := syms[:0]
			for j := 0; j < len(syms); j++ {
				if j+1 < len(syms) && syms[j] == best[0] && syms[j+1] == best[1] {
					out = append(out, joined)
					j++
					continue
				}
				out = append(out, syms[j])
			}
			words[i] = out
		}
	}
	return merges, symbols
}

func less(a, b [2]string) bool {
	if a[0] != b[0] {
		return a[0] < b[0]
	}
	return a[1] < b[1]
}

// trainingWords splits text roughly as byte-level pre-tokenizers do: a
// run of letters, of digits or of other non-space characters, with at most
// one space in front. Merges never cross these boundaries, so the merges
// learned are ones a GPT-2 style splitter can apply.
func trainingWords(text string) []string {
	class := func(r rune) int {
		switch {
		case unicode.IsSpace(r):
			return 0
		case unicode.IsLetter(r):
			return 1
		case unicode.IsNumber(r):
			return 2
		}
		return 3
	}
	var words []string
	var cur strings.Builder
	curClass := -1
	flush := func() {
		if cur.Len() > 0 {
			words = append(words, cur.String())
			cur.Reset()
		}
	}
	for _, r := range text {
		c := class(r)
		switch {
		case c == 0:
			flush()
			if r == ' ' {
				cur.WriteRune(r) // leads the next word
				curClass = 0
				continue
			}
			curClass = -1
			continue
		case curClass == 0 || c == curClass:
			cur.WriteRune(r)
		default:
			flush()
			cur.WriteRune(r)
		}
		curClass = c
	}
	flush()
	return words
}
