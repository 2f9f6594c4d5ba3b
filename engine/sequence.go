package engine

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"

	"h3infer/constrain"
	"h3infer/infer"
	"h3infer/tokenize"
	"h3infer/toolcall"
)

// RequestError is a request that cannot be served as asked. Code is one of
// the infer.Code* values; the worker sends it to the gateway as is.
type RequestError struct {
	Code    string
	Message string
}

func (e *RequestError) Error() string { return e.Code + ": " + e.Message }

// sequence is one request being answered: its prompt, sampler and text
// stream, and its row in its model's batch. The loop and Generate both
// drive it the same way (prefill alone, then decode steps in the batch,
// sampling from each step's logits), which is why they produce the same
// text for the same request.
type sequence struct {
	m          Model
	prompt     []int
	smp        *sampler
	text       *tokenize.Stream
	limit      int // completion tokens allowed: max_tokens or the context left
	ignoreEOS  bool
	completion int
	last       int // the token fed at the next step, once prefilled
	// biasTop is the largest token logit_bias names, -1 when none: only
	// the prefill's logits tell whether the model has it.
	biasTop int
	// format is the compiled response_format; nil when the request asks
	// for none. Its matcher joins the sampler at prefill, when the
	// logits say the vocabulary's width.
	format *constrain.Grammar
	// vocab is the vocabulary the matcher masks over, once prefilled,
	// for the other choices of the request to match over too.
	vocab *constrain.Vocab

	row    int       // row in its model's batch; -1 when in none
	logits []float32 // of the latest forward pass, sampled by next

	// tools parses the completion's tool calls; nil when the request
	// offers the model none. serialCalls ends it on its first call.
	tools       *toolcall.Parser
	serialCalls bool
	// markers spells the tool call family's markers that are special
	// tokens of the model's tokenizer, by id, for the parser to read;
	// nil when there are none or the request offers no tools.
	markers map[int]string
}

func newSequence(m Model, s *infer.Request) (*sequence, error) {
	if s.Prompt != "" && len(s.Messages) > 0 {
		return nil, &RequestError{infer.CodeInvalidRequest, "set either a prompt or messages, not both"}
	}
	if t := s.Temperature; t < 0 || math.IsNaN(float64(t)) || math.IsInf(float64(t), 0) {
		return nil, &RequestError{infer.CodeInvalidRequest, fmt.Sprintf("temperature must be >= 0, got %v", t)}
	}
	if p := s.TopP; !(p >= 0 && p <= 1) {
		return nil, &RequestError{infer.CodeInvalidRequest, fmt.Sprintf("top_p must be in [0, 1], got %v", p)}
	}
	if err := checkSampling(s); err != nil {
		return nil, err
	}
	if s.TopLogprobs > infer.MaxTopLogprobs {
		return nil, &RequestError{infer.CodeInvalidRequest, fmt.Sprintf("top_logprobs: must be at most %d, got %d", infer.MaxTopLogprobs, s.TopLogprobs)}
	}
	if s.TopLogprobs > 0 && !s.Logprobs {
		return nil, &RequestError{infer.CodeInvalidRequest, fmt.Sprintf("top_logprobs: requires logprobs, got %d without it", s.TopLogprobs)}
	}
	format, err := constrain.Parse([]byte(s.ResponseFormat))
	if s.ResponseFormat != "" && err != nil {
		return nil, &RequestError{infer.CodeInvalidRequest, err.Error()}
	}
	tools, err := setupTools(m, s)
	if err != nil {
		return nil, err
	}
	if tools.format != nil {
		if format != nil {
			return nil, &RequestError{infer.CodeInvalidRequest, "tool_choice: a required call cannot be combined with response_format"}
		}
		format = tools.format
	}
	info := m.Info()
	text := s.Prompt
	if len(s.Messages) > 0 {
		var err error
		if text, err = m.ChatTemplate().RenderTools(s.Messages, tools.tools, true); err != nil {
			// A conversation the model's format cannot express is the
			// request's fault.
			if ce, ok := errors.AsType[*tokenize.ConversationError](err); ok {
				return nil, &RequestError{infer.CodeInvalidRequest, ce.Message}
			}
			return nil, fmt.Errorf("model %s: %w", info.Name, err)
		}
	}
	// As Hugging Face's encoders and vLLM do, a raw prompt gets the
	// tokenizer's special tokens and a rendered chat, which writes its
	// own, none.
	var prompt []int
	if len(s.Messages) > 0 {
		prompt = m.Encode(text)
	} else {
		prompt = m.EncodeSpecial(text)
	}
	if len(prompt) == 0 {
		return nil, &RequestError{infer.CodeInvalidRequest, "the prompt is empty"}
	}
	ctxLen := int(info.ContextLength)
	if len(prompt) >= ctxLen {
		return nil, &RequestError{infer.CodeContextLength, fmt.Sprintf(
			"the prompt has %d tokens but model %s has a context length of %d tokens, which leaves no room for a completion",
			len(prompt), info.Name, ctxLen)}
	}
	limit := ctxLen - len(prompt)
	if s.MaxTokens > 0 && int64(s.MaxTokens) < int64(limit) {
		limit = int(s.MaxTokens)
	}
	seed := s.Seed
	if !s.HasSeed {
		seed = rand.Uint64()
	}
	biasTop := -1
	if n := len(s.LogitBias); n > 0 {
		biasTop = int(s.LogitBias[n-1].Token)
	}
	return &sequence{
		m:           m,
		prompt:      prompt,
		smp:         newSampler(s, prompt, seed),
		text:        tokenize.NewStream(s.Stop),
		limit:       limit,
		ignoreEOS:   s.IgnoreEOS,
		last:        -1,
		biasTop:     biasTop,
		format:      format,
		row:         -1,
		tools:       tools.parser,
		serialCalls: tools.serial,
		markers:     tools.markers,
	}, nil
}

// checkSampling checks the sampling parameters beyond temperature and
// top_p. The gateway checks their ranges too, but the worker samples
// with them and trusts no one: a NaN min_p, say, would leave the sampler
// no token to pick. Only logit_bias's tokens wait for the vocabulary
// (prefill).
func checkSampling(s *infer.Request) error {
	invalid := func(format string, args ...any) error {
		return &RequestError{infer.CodeInvalidRequest, fmt.Sprintf(format, args...)}
	}
	finite := func(f float32) bool { return !math.IsNaN(float64(f)) && !math.IsInf(float64(f), 0) }
	if p := s.MinP; !(p >= 0 && p <= 1) {
		return invalid("min_p must be in [0, 1], got %v", p)
	}
	if p := s.PresencePenalty; !finite(p) {
		return invalid("presence_penalty must be a finite number, got %v", p)
	}
	if p := s.FrequencyPenalty; !finite(p) {
		return invalid("frequency_penalty must be a finite number, got %v", p)
	}
	if p := s.RepetitionPenalty; !(p >= 0) || !finite(p) {
		return invalid("repetition_penalty must be a finite number >= 0, got %v", p)
	}
	for i, b := range s.LogitBias {
		if !finite(b.Bias) {
			return invalid("logit_bias: token %d has bias %v, which is not a finite number", b.Token, b.Bias)
		}
		if i > 0 && b.Token <= s.LogitBias[i-1].Token {
			return invalid("logit_bias: tokens must be ascending and unique, got %d after %d", b.Token, s.LogitBias[i-1].Token)
		}
	}
	return nil
}

// prefill runs the prompt alone and leaves its logits for next. It returns
// the prompt's cache for the model's Join. A logit_bias token the model
// does not have is a *RequestError.
func (q *sequence) prefill() ([][]byte, error) {
	logits, cache, err := q.m.Prefill(q.prompt)
	if err != nil {
		return nil, err
	}
	// The width of the logits is the vocabulary, and the one every model
	// knows: a graph may leave it symbolic until it runs.
	if q.biasTop >= len(logits) {
		return nil, &RequestError{infer.CodeInvalidRequest, fmt.Sprintf(
			"logit_bias: token %d is not in model %s's vocabulary of %d tokens", q.biasTop, q.m.Info().Name, len(logits))}
	}
	if q.format != nil {
		v, err := vocabulary(q.m, len(logits))
		if q.markers != nil {
			// The forced call's markers are special tokens that this
			// request spells: its own vocabulary has them.
			v, err = constrain.NewVocab(len(logits), q.piece)
		}
		if err != nil {
			return nil, &RequestError{infer.CodeInvalidRequest, fmt.Sprintf(
				"response_format: model %s cannot be constrained to JSON: %v", q.m.Info().Name, err)}
		}
		q.smp.format = constrain.NewMatcher(q.format, v)
		q.vocab = v
	}
	q.logits = logits
	return cache, nil
}

// vocabularyModel is a Model that builds the constrain.Vocab of its
// tokens once and keeps it, for every constrained request to share with
// its cache of masks. Other models build one per request.
type vocabularyModel interface {
	Vocabulary(width int) (*constrain.Vocab, error)
}

func vocabulary(m Model, width int) (*constrain.Vocab, error) {
	if vm, ok := m.(vocabularyModel); ok {
		return vm.Vocabulary(width)
	}
	return constrain.NewVocab(width, m.Piece)
}

// nextText samples one token from the latest logits. It returns the text
// that token releases, with the token's logprobs when the request asks
// for them (also when the text is held back, and on the token that ends
// the request), and a non-nil Done when the request is finished. next
// (tools.go) reads the text for tool calls.
func (q *sequence) nextText() (infer.Token, *infer.Done) {
	id := q.smp.sample(q.logits)
	q.completion++
	tok := infer.Token{Count: 1}
	piece, end := q.piece(id)
	if lp := q.smp.lp; lp != nil {
		tok.Logprobs = q.logprobs(lp, piece)
	}
	if end {
		if !q.ignoreEOS {
			tok.Text = q.text.Flush()
			return tok, q.done(infer.FinishStop)
		}
		piece = "" // an end token carries no text of its own
	}
	text, stopped := q.text.Push(piece)
	tok.Text = text
	if stopped {
		return tok, q.done(infer.FinishStop)
	}
	if f := q.smp.format; f != nil && f.Complete() {
		// The document is whole and only an end token may follow: end
		// now rather than spend a step on it.
		tok.Text += q.text.Flush()
		return tok, q.done(infer.FinishStop)
	}
	if q.completion >= q.limit {
		tok.Text += q.text.Flush()
		return tok, q.done(infer.FinishLength)
	}
	q.last = id
	return tok, nil
}

// logprobs is the entry of the token just sampled, whose piece is piece:
// with its Top, the allocations a step makes only when asked for logprobs.
func (q *sequence) logprobs(lp *stepLogprobs, piece string) []infer.TokenLogprob {
	e := []infer.TokenLogprob{{Token: piece, Logprob: float32(lp.chosen)}}
	if len(lp.best) > 0 {
		e[0].Top = make([]infer.TopLogprob, len(lp.best))
		for i, c := range lp.best {
			p, _ := q.piece(c.id)
			e[0].Top[i] = infer.TopLogprob{Token: p, Logprob: float32(c.p)}
		}
		if q.smp.format != nil {
			// Tokens the mask left out have no probability; they are
			// not among the likely ones, even where fewer tokens than
			// asked for are allowed.
			e[0].Top = slices.DeleteFunc(e[0].Top, func(t infer.TopLogprob) bool { return math.IsInf(float64(t.Logprob), -1) })
		}
	}
	return e
}

// reserve is how many tokens the sequence's cache can grow to.
func (q *sequence) reserve() int { return len(q.prompt) + q.limit }

func (q *sequence) done(reason string) *infer.Done {
	return &infer.Done{
		FinishReason:     reason,
		PromptTokens:     uint32(len(q.prompt)),
		CompletionTokens: uint32(q.completion),
	}
}

// Generate answers s on m in process, exactly as the worker's loop would
// for the same request (s.Model is not consulted), and returns the whole
// text. m's batch must be empty and stay m's alone until Generate returns,
// which it leaves empty again: a model not yet serving, as the warm-up of
// a new version is, or one in a test. It exists so that a new version can
// be checked before it serves, and so that tests can check that the ring
// carries the tokens a model really produced. Errors the request caused
// are *RequestError.
func Generate(ctx context.Context, m Model, s *infer.Request) (string, infer.Done, error) {
	var out strings.Builder
	done, err := generate(ctx, m, s, func(t infer.Token) { out.WriteString(t.Text) })
	return out.String(), done, err
}

// generate is Generate handing each token, as the loop would send it, to
// each.
func generate(ctx context.Context, m Model, s *infer.Request, each func(infer.Token)) (infer.Done, error) {
	q, err := newSequence(m, s)
	if err != nil {
		return infer.Done{}, err
	}
	if err := ctx.Err(); err != nil {
		return infer.Done{}, fmt.Errorf("generate: %w", err)
	}
	cache, err := q.prefill()
	if err != nil {
		return infer.Done{}, err
	}
	defer func() {
		if q.row >= 0 {
			m.Leave(q.row)
		}
	}()
	next := []int{0}
	for {
		tok, done := q.next()
		each(tok)
		if done != nil {
			return *done, nil
		}
		if q.row < 0 {
			m.Join(cache, len(q.prompt))
			q.row, cache = 0, nil
		}
		if err := ctx.Err(); err != nil {
			return infer.Done{}, fmt.Errorf("generate: %w", err)
		}
		next[0] = q.last
		if q.logits, err = m.Step(next); err != nil {
			return infer.Done{}, err
		}
	}
}
