package backend

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"

	"h3infer/infer"
)

// RequestError is a request that cannot be served as asked. Code is one of
// the transport.Code* values; the worker sends it to the gateway as is.
type RequestError struct {
	Code    string
	Message string
}

func (e *RequestError) Error() string { return e.Code + ": " + e.Message }

// generation is one request being answered: its place in a batch,
// sampler and text stream. The worker and Model.Generate both drive it
// the same way (prefill alone, then decode steps in a batch, sampling from
// each step's logits), which is why they produce the same text for the
// same Submit.
type generation struct {
	m          *Model
	prompt     []int
	smp        *sampler
	text       *textStream
	limit      int // completion tokens allowed: max_tokens or the context left
	ignoreEOS  bool
	completion int
	last       int // the token fed at the next step, once prefilled

	n      int       // tokens in the KV cache
	row    int       // row in its batch; -1 when in none
	logits []float32 // of the latest forward pass, sampled by next
}

func (m *Model) newGeneration(s *infer.Request) (*generation, error) {
	if s.Prompt != "" && len(s.Messages) > 0 {
		return nil, &RequestError{infer.CodeInvalidRequest, "set either a prompt or messages, not both"}
	}
	if t := s.Temperature; t < 0 || math.IsNaN(float64(t)) || math.IsInf(float64(t), 0) {
		return nil, &RequestError{infer.CodeInvalidRequest, fmt.Sprintf("temperature must be >= 0, got %v", t)}
	}
	if p := s.TopP; !(p >= 0 && p <= 1) {
		return nil, &RequestError{infer.CodeInvalidRequest, fmt.Sprintf("top_p must be in [0, 1], got %v", p)}
	}
	text := s.Prompt
	if len(s.Messages) > 0 {
		var err error
		if text, err = applyTemplate(m.cfg.ChatTemplate, s.Messages); err != nil {
			return nil, fmt.Errorf("model %s: %w", m.name, err)
		}
	}
	prompt := m.tok.encode(text)
	if len(prompt) == 0 {
		return nil, &RequestError{infer.CodeInvalidRequest, "the prompt is empty"}
	}
	ctxLen := m.cfg.ContextLength
	if len(prompt) >= ctxLen {
		return nil, &RequestError{infer.CodeContextLength, fmt.Sprintf(
			"the prompt has %d tokens but model %s has a context length of %d tokens, which leaves no room for a completion",
			len(prompt), m.name, ctxLen)}
	}
	limit := ctxLen - len(prompt)
	if s.MaxTokens > 0 && int64(s.MaxTokens) < int64(limit) {
		limit = int(s.MaxTokens)
	}
	seed := s.Seed
	if !s.HasSeed {
		seed = rand.Uint64()
	}
	return &generation{
		m:         m,
		prompt:    prompt,
		smp:       newSampler(s.Temperature, s.TopP, seed),
		text:      newTextStream(s.Stop),
		limit:     limit,
		ignoreEOS: s.IgnoreEOS,
		last:      -1,
		row:       -1,
	}, nil
}

// prefill runs the prompt alone and leaves its logits for next. It returns
// the prompt's KV cache for batch.join.
func (g *generation) prefill() ([][]byte, error) { return g.prefill0(g.prompt) }

// prefill0 prefills ids as the sequence's whole context.
func (g *generation) prefill0(ids []int) ([][]byte, error) {
	logits, kv, err := g.m.prefill(ids)
	if err != nil {
		return nil, err
	}
	g.logits, g.n = logits, len(ids)
	return kv, nil
}

// next samples one token from the latest logits. It returns the text that
// token releases, and a non-nil Done when the request is finished.
func (g *generation) next() (infer.Token, *infer.Done) {
	id := g.smp.sample(g.logits)
	g.completion++
	tok := infer.Token{Count: 1}
	piece := g.m.tok.piece(id)
	if g.m.stopIDs[id] {
		if !g.ignoreEOS {
			tok.Text = g.text.flush()
			return tok, g.done(infer.FinishStop)
		}
		piece = nil // an end token carries no text of its own
	}
	text, stopped := g.text.push(piece)
	tok.Text = text
	if stopped {
		return tok, g.done(infer.FinishStop)
	}
	if g.completion >= g.limit {
		tok.Text += g.text.flush()
		return tok, g.done(infer.FinishLength)
	}
	g.last = id
	return tok, nil
}

// reserve is how many tokens the sequence's cache can grow to.
func (g *generation) reserve() int { return len(g.prompt) + g.limit }

func (g *generation) done(reason string) *infer.Done {
	return &infer.Done{
		FinishReason:     reason,
		PromptTokens:     uint32(len(g.prompt)),
		CompletionTokens: uint32(g.completion),
	}
}

// Generate answers s in process, exactly as a worker would for the same
// Submit (s.Model is not consulted), and returns the whole text. It exists
// so that tests can check that the ring carries the tokens a model really
// produced. Errors the request caused are *RequestError.
func (m *Model) Generate(ctx context.Context, s *infer.Request) (string, infer.Done, error) {
	g, err := m.newGeneration(s)
	if err != nil {
		return "", infer.Done{}, err
	}
	if err := ctx.Err(); err != nil {
		return "", infer.Done{}, fmt.Errorf("generate: %w", err)
	}
	b := m.newBatch()
	defer b.close()
	var out strings.Builder
	kv, err := g.prefill()
	if err != nil {
		return "", infer.Done{}, err
	}
	for {
		tok, done := g.next()
		out.WriteString(tok.Text)
		if done != nil {
			return out.String(), *done, nil
		}
		if kv != nil {
			b.join(g, kv)
			kv = nil
		}
		if err := ctx.Err(); err != nil {
			return out.String(), infer.Done{}, fmt.Errorf("generate: %w", err)
		}
		if err := b.step(); err != nil {
			return out.String(), infer.Done{}, err
		}
	}
}
