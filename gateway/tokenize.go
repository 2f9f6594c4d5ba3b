package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"time"

	"h3infer/infer"
)

// The token routes, POST /tokenize and POST /detokenize, in the shape vLLM
// serves them: a client counts a prompt's tokens before it sends it, with
// the tokenizer and chat template of the model version its completion
// would run on (Config.Tokenizers).

// Tokenizers gives the token routes the tokenizer of the version of model
// that a completion with routing key and pin (VersionHeader) would be
// served by, and that version's name. Errors with a NotFound() bool method
// that returns true become 404; a *NoTokenizerError 400.
type Tokenizers interface {
	Tokenizer(ctx context.Context, model, key, pin string) (t Tokenizer, version string, err error)
}

// Tokenizer is one model version's tokenizer and chat template, as its
// workers use them.
type Tokenizer interface {
	// EncodePrompt is the token ids of a text prompt; addSpecial adds the
	// tokens the tokenizer's post-processor adds (BOS, say).
	EncodePrompt(text string, addSpecial bool) []int
	// EncodeChat is the token ids of a conversation rendered with the
	// chat template. An error with a BadRequest method that returns true
	// is a conversation the template refuses, the request's fault; any
	// other is the model's.
	EncodeChat(msgs []infer.ChatMessage, addGenerationPrompt, addSpecial bool) ([]int, error)
	// Decode is the text of ids, each below VocabSize, special tokens
	// included.
	Decode(ids []int) string
	// TokenStrings is each id's entry in the vocabulary.
	TokenStrings(ids []int) []string
	VocabSize() int
	ContextLength() int
}

// NoTokenizerError is a model whose tokens the gateway cannot count: its
// backend tokenizes elsewhere (an upstream server) or not at all (the
// synthetic model). Counting with another tokenizer would give a wrong
// count, so the client is told instead.
type NoTokenizerError struct {
	Model  string
	Reason string // "is served by an upstream"
}

func (e *NoTokenizerError) Error() string {
	return fmt.Sprintf("model %q %s; /tokenize and /detokenize are not available for it", e.Model, e.Reason)
}

// tokenizeRequest is vLLM's TokenizeCompletionRequest and
// TokenizeChatRequest in one: prompt or messages. Unknown fields are
// refused by name; vLLM's chat options that h3infer does not implement
// are refused when they ask for something.
type tokenizeRequest struct {
	Model                string          `json:"model"`
	Prompt               *string         `json:"prompt"`
	Messages             []chatMessage   `json:"messages"`
	AddSpecialTokens     *bool           `json:"add_special_tokens"`
	AddGenerationPrompt  *bool           `json:"add_generation_prompt"`
	ContinueFinalMessage *bool           `json:"continue_final_message"`
	ReturnTokenStrs      *bool           `json:"return_token_strs"`
	ChatTemplate         json.RawMessage `json:"chat_template"`
	ChatTemplateKwargs   json.RawMessage `json:"chat_template_kwargs"`
	Tools                json.RawMessage `json:"tools"`
	MMProcessorKwargs    json.RawMessage `json:"mm_processor_kwargs"`
	MediaIOKwargs        json.RawMessage `json:"media_io_kwargs"`
}

type tokenizeResponse struct {
	Count       int      `json:"count"`
	MaxModelLen int      `json:"max_model_len"`
	Tokens      []int    `json:"tokens"`
	TokenStrs   []string `json:"token_strs"` // null unless return_token_strs
}

type detokenizeRequest struct {
	Model  string  `json:"model"`
	Tokens []int64 `json:"tokens"`
}

type detokenizeResponse struct {
	Prompt string `json:"prompt"`
}

// tokenizeJob is a checked /tokenize request.
type tokenizeJob struct {
	prompt              string
	messages            []infer.ChatMessage // set for a chat
	addSpecial          bool
	addGenerationPrompt bool
	tokenStrs           bool
}

// parseTokenize decodes and checks a /tokenize body. Every refusal names
// the parameter at fault.
func parseTokenize(body []byte) (model string, job tokenizeJob, err error) {
	var req tokenizeRequest
	if err := decodeBody(body, &req); err != nil {
		return "", job, err
	}
	if req.Model == "" {
		return "", job, invalidf("model", "model: required")
	}
	for _, p := range [...]struct {
		name string
		raw  json.RawMessage
	}{
		{"chat_template", req.ChatTemplate}, {"chat_template_kwargs", req.ChatTemplateKwargs}, {"tools", req.Tools},
		{"mm_processor_kwargs", req.MMProcessorKwargs}, {"media_io_kwargs", req.MediaIOKwargs},
	} {
		if raw := bytes.TrimSpace(p.raw); len(raw) > 0 && !bytes.Equal(raw, []byte("null")) && !bytes.Equal(raw, []byte("{}")) && !bytes.Equal(raw, []byte("[]")) {
			return "", job, invalidf(p.name, "%s: not supported by this server; the model's own chat template is used", p.name)
		}
	}
	job.tokenStrs = req.ReturnTokenStrs != nil && *req.ReturnTokenStrs
	switch {
	case req.Prompt != nil && req.Messages != nil:
		return "", job, invalidf("messages", "messages: set either prompt or messages, not both")
	case req.Prompt != nil:
		for name, set := range map[string]bool{"add_generation_prompt": req.AddGenerationPrompt != nil, "continue_final_message": req.ContinueFinalMessage != nil} {
			if set {
				return "", job, invalidf(name, "%s: only with messages", name)
			}
		}
		job.prompt = *req.Prompt
		// vLLM's default for a prompt: the tokens a completion adds.
		job.addSpecial = req.AddSpecialTokens == nil || *req.AddSpecialTokens
	case req.Messages != nil:
		msgs, err := chatMessages(req.Messages)
		if err != nil {
			return "", job, err
		}
		job.messages = msgs
		// vLLM's defaults for a chat: the template writes the special
		// tokens itself, and ends with the assistant's turn.
		job.addSpecial = req.AddSpecialTokens != nil && *req.AddSpecialTokens
		job.addGenerationPrompt = req.AddGenerationPrompt == nil || *req.AddGenerationPrompt
		if req.ContinueFinalMessage != nil && *req.ContinueFinalMessage {
			return "", job, invalidf("continue_final_message", "continue_final_message: not supported by this server")
		}
	default:
		return "", job, invalidf("prompt", "prompt: required (or messages, for a chat)")
	}
	return req.Model, job, nil
}

// parseDetokenize decodes and checks a /detokenize body; the ids are
// checked against the vocabulary once the model's tokenizer is known.
func parseDetokenize(body []byte) (model string, ids []int64, err error) {
	var req detokenizeRequest
	if err := decodeBody(body, &req); err != nil {
		return "", nil, err
	}
	if req.Model == "" {
		return "", nil, invalidf("model", "model: required")
	}
	if req.Tokens == nil {
		return "", nil, invalidf("tokens", "tokens: required")
	}
	return req.Model, req.Tokens, nil
}

// decodeBody decodes one JSON object into v, refusing unknown fields by
// name and anything after the object.
func decodeBody(body []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if name, ok := unknownField(err); ok {
		return invalidf(name, "%s: unknown parameter", name)
	}
	if _, trailing := dec.Token(); err != nil || trailing != io.EOF {
		if uerr := json.Unmarshal(body, new(any)); uerr != nil {
			err = uerr
		}
		if err == nil {
			err = invalidf("", "the request body holds more than one JSON value")
		}
		return fmt.Errorf("decode request: %w", err)
	}
	return nil
}

// tokenizeSlots bounds how many token requests encode at once: encoding
// costs CPU in the gateway process itself (a prompt near the body limit,
// in a long run without spaces, is the costly case), and the gateway's
// cores also carry every stream. Half the cores, at least one.
func tokenizeSlots() int { return max(1, runtime.GOMAXPROCS(0)/2) }

// tokenCall is what both token routes do before their own work: read the
// body, check the model and the caller's right to it, admit under the
// tenant's rate limits, take an encoding slot within the request's
// deadline, and find the version's tokenizer. The caller runs done when
// it has answered.
func (g *Gateway) tokenCall(w http.ResponseWriter, r *http.Request, parse func([]byte) (string, error)) (tok Tokenizer, model string, done func(), err error) {
	if r.Method != http.MethodPost {
		return nil, "", nil, &methodNotAllowed{method: r.Method, allow: http.MethodPost}
	}
	if g.cfg.Tokenizers == nil {
		return nil, "", nil, errRouteNotFound
	}
	start := time.Now()
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, g.cfg.MaxBodyBytes))
	if err != nil {
		if _, tooLarge := errors.AsType[*http.MaxBytesError](err); !tooLarge && r.Context().Err() == nil {
			err = invalidf("", "reading the request body: %v", err)
		}
		return nil, "", nil, err
	}
	if model, err = parse(body); err != nil {
		return nil, "", nil, err
	}
	if err := g.checkModel(model); err != nil {
		return nil, "", nil, err
	}
	if _, err := identify(r.Context(), model); err != nil {
		return nil, "", nil, err
	}
	deadline, err := g.deadlineOf(r.Header, start)
	if err != nil {
		return nil, "", nil, err
	}
	ctx, cancel := context.WithDeadlineCause(r.Context(), deadline, errDeadlinePassed)
	tenant := g.cfg.Tenant(r)
	adm, err := g.limits.Load().admit(ctx, tenant, 0, w.Header())
	if err != nil {
		cancel()
		if lim, ok := errors.AsType[*rateLimited](err); ok {
			g.refused(ctx, lim)
			return nil, "", nil, err
		}
		g.log.Warn("rate limit not checked; admitting", "tenant", tenant, "err", err)
		adm = nil
	}
	release := func() {
		if adm != nil {
			adm.release(ctx, 0)
		}
		cancel()
	}
	select {
	case g.tokenizing <- struct{}{}:
	case <-ctx.Done():
		release()
		return nil, "", nil, deadlineCause(ctx, ctx.Err())
	}
	done = func() {
		<-g.tokenizing
		release()
	}
	tok, ver, err := g.cfg.Tokenizers.Tokenizer(ctx, model, tenant, r.Header.Get(VersionHeader))
	if err != nil {
		done()
		if _, ok := errors.AsType[*NoTokenizerError](err); !ok && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
			if nf, ok := err.(interface{ NotFound() bool }); !ok || !nf.NotFound() {
				g.log.Error("tokenizer not loaded", "model", model, "err", err)
			}
		}
		return nil, "", nil, deadlineCause(ctx, err)
	}
	if ver != "" {
		w.Header().Set(VersionHeader, ver)
	}
	return tok, model, done, nil
}

func (g *Gateway) serveTokenize(w http.ResponseWriter, r *http.Request) {
	var job tokenizeJob
	tok, model, done, err := g.tokenCall(w, r, func(body []byte) (string, error) {
		model, j, err := parseTokenize(body)
		job = j
		return model, err
	})
	if err != nil {
		writeError(w, err)
		return
	}
	defer done()
	var ids []int
	if job.messages != nil {
		if ids, err = tok.EncodeChat(job.messages, job.addGenerationPrompt, job.addSpecial); err != nil {
			// A conversation the template refuses is the request's fault;
			// any other failure to render is the model's.
			if bad, ok := errors.AsType[interface {
				error
				BadRequest() bool
			}](err); ok && bad.BadRequest() {
				writeError(w, invalidf("messages", "%s", err.Error()))
				return
			}
			g.log.Error("render chat template", "model", model, "err", err)
			writeError(w, fmt.Errorf("model %s: render the chat template: %w", model, err))
			return
		}
	} else {
		ids = tok.EncodePrompt(job.prompt, job.addSpecial)
	}
	resp := tokenizeResponse{Count: len(ids), MaxModelLen: tok.ContextLength(), Tokens: ids}
	if resp.Tokens == nil {
		resp.Tokens = []int{}
	}
	if job.tokenStrs {
		resp.TokenStrs = tok.TokenStrings(resp.Tokens)
	}
	writeJSON(w, resp)
}

func (g *Gateway) serveDetokenize(w http.ResponseWriter, r *http.Request) {
	var raw []int64
	tok, model, done, err := g.tokenCall(w, r, func(body []byte) (string, error) {
		model, ids, err := parseDetokenize(body)
		raw = ids
		return model, err
	})
	if err != nil {
		writeError(w, err)
		return
	}
	defer done()
	n := tok.VocabSize()
	ids := make([]int, len(raw))
	for i, id := range raw {
		if id < 0 || id >= int64(n) {
			writeError(w, invalidf("tokens", "tokens[%d]: %d is not a token id of model %s, whose ids are 0 to %d", i, id, model, n-1))
			return
		}
		ids[i] = int(id)
	}
	writeJSON(w, detokenizeResponse{Prompt: tok.Decode(ids)})
}
