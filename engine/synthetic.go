package engine

import (
	"time"
	"unicode"

	"h3infer/infer"
	"h3infer/tokenize"
)

// SyntheticToken is the text of every synthetic token. The comparison
// server of the bench tooling writes the same text, so both send the same
// bytes.
const SyntheticToken = " tok"

// syntheticContextLength is what a synthetic model reports; it bounds
// prompt and max_tokens only.
const syntheticContextLength = 1 << 20

// synthetic is the model a directory of workerconf.SyntheticDir selects:
// a Model whose every step costs nothing, or a fixed interval, so that
// h3infer bench measures the gateway and the loop that serves real
// models, without a model's compute. A prompt's tokens are its
// whitespace-separated words; its vocabulary is the one token
// SyntheticToken, which never ends a sequence, so every request runs to
// its max_tokens.
type synthetic struct {
	name     string
	interval time.Duration
	// due is when each row may take its next token; empty when unpaced.
	due []time.Time
	// zeros are the logits of a step, one per row: with a vocabulary of
	// one token there is nothing else to say.
	zeros []float32
	chat  *tokenize.ChatTemplate
}

func newSynthetic(name string, interval time.Duration) *synthetic {
	plain, _ := tokenize.LookupTemplate(tokenize.TemplatePlain)
	return &synthetic{name: name, interval: interval, chat: plain}
}

func (s *synthetic) Info() infer.ModelInfo {
	return infer.ModelInfo{Name: s.name, ContextLength: syntheticContextLength}
}

// ChatTemplate is plain: each message's content on a line, so a chat's
// words are its messages' words.
func (s *synthetic) ChatTemplate() *tokenize.ChatTemplate { return s.chat }

// EncodeSpecial is Encode: the synthetic vocabulary has no special tokens.
func (s *synthetic) EncodeSpecial(text string) []int { return s.Encode(text) }

// Encode gives each word of text the one token id, 0.
func (s *synthetic) Encode(text string) []int {
	words, inWord := 0, false
	for _, r := range text {
		space := unicode.IsSpace(r)
		if !space && !inWord {
			words++
		}
		inWord = !space
	}
	return make([]int, words)
}

func (s *synthetic) Piece(int) (string, bool) { return SyntheticToken, false }

// Prefill costs nothing, as every step does: the first token of a paced
// sequence is due at once, as a real model's comes after its prefill.
// It touches no row, so it may run beside Step.
func (s *synthetic) Prefill([]int) ([]float32, [][]byte, error) { return make([]float32, 1), nil, nil }

func (s *synthetic) Join(_ [][]byte, _ int) {
	s.zeros = append(s.zeros, 0)
	if s.interval > 0 {
		s.due = append(s.due, time.Now().Add(s.interval))
	}
}

func (s *synthetic) Leave(r int) {
	last := len(s.zeros) - 1
	if r < 0 || r > last {
		return
	}
	s.zeros = s.zeros[:last]
	if s.interval > 0 {
		s.due[r] = s.due[last]
		s.due = s.due[:last]
	}
}

// Step advances every row once the last of them is due. A paced model is
// one whose decode step takes the interval: no sequence gets tokens
// faster than one per interval, and a row that joins holds the next step
// until it is due, one interval after its first token, so the rows
// already there wait at most that long once.
func (s *synthetic) Step(next []int) ([]float32, error) {
	if s.interval > 0 && len(s.due) > 0 {
		last := s.due[0]
		for _, d := range s.due[1:] {
			if d.After(last) {
				last = d
			}
		}
		if wait := time.Until(last); wait > 0 {
			time.Sleep(wait)
		}
		due := time.Now().Add(s.interval)
		for i := range s.due {
			s.due[i] = due
		}
	}
	return s.zeros[:len(next)], nil
}

// KVBytes is 0: a synthetic sequence holds no cache, so only slots bound
// how many run.
func (s *synthetic) KVBytes(int, int) int64 { return 0 }

func (s *synthetic) Close() error {
	s.due, s.zeros = nil, nil
	return nil
}
