package gateway

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"

	"h3infer/constrain"
	"h3infer/infer"
)

// apiKind tells the two completion routes apart.
type apiKind int

const (
	kindChat apiKind = iota // POST /v1/chat/completions
	kindText                // POST /v1/completions
)

// promptParam names the field holding the prompt, for errors about it.
func (k apiKind) promptParam() string {
	if k == kindChat {
		return "messages"
	}
	return "prompt"
}

// completionRequest is the OpenAI request body, with the sampling
// parameters vLLM and SGLang add (top_k, min_p, repetition_penalty). A
// field it does not name is refused (400 naming it), never dropped; the
// fields of OpenAI's API that h3infer does not implement are named in
// unsupported, and refused when they ask for anything; the hints in
// ignoredHints are accepted and ignored.
type completionRequest struct {
	Model               string          `json:"model"`
	Messages            []chatMessage   `json:"messages"`
	Prompt              json.RawMessage `json:"prompt"`
	MaxTokens           *int64          `json:"max_tokens"`
	MaxCompletionTokens *int64          `json:"max_completion_tokens"`
	Temperature         *float64        `json:"temperature"`
	TopP                *float64        `json:"top_p"`
	TopK                *int64          `json:"top_k"`
	MinP                *float64        `json:"min_p"`
	PresencePenalty     *float64        `json:"presence_penalty"`
	FrequencyPenalty    *float64        `json:"frequency_penalty"`
	RepetitionPenalty   *float64        `json:"repetition_penalty"`
	LogitBias           json.RawMessage `json:"logit_bias"`
	// Logprobs is a boolean for chat and a count of alternatives (0 to
	// 5) for text completions; TopLogprobs is chat's count (0 to 20).
	Logprobs    json.RawMessage `json:"logprobs"`
	TopLogprobs *int64          `json:"top_logprobs"`
	Seed        *int64          `json:"seed"`
	// IgnoreEOS generates up to max_tokens past the model's end tokens,
	// for benchmarks that need fixed output lengths (a common extension
	// of OpenAI-compatible servers). Stop strings still apply.
	IgnoreEOS     bool            `json:"ignore_eos"`
	Stop          json.RawMessage `json:"stop"`
	Stream        bool            `json:"stream"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	N *int64 `json:"n"`
	// ResponseFormat asks for JSON: any object (json_object) or one a
	// JSON Schema accepts (json_schema), enforced by the worker's token
	// masks (package constrain).
	ResponseFormat json.RawMessage `json:"response_format"`
	// User is OpenAI's end-user id; h3infer keys sticky canary splits by it.
	User string `json:"user"`
	// Tools, ToolChoice and ParallelToolCalls are OpenAI's function
	// calling (tools.go).
	Tools             json.RawMessage `json:"tools"`
	ToolChoice        json.RawMessage `json:"tool_choice"`
	ParallelToolCalls *bool           `json:"parallel_tool_calls"`

	unsupported
	ignoredHints
}

// unsupported are OpenAI's parameters that h3infer does not implement yet.
// Each is accepted only at a value that asks for nothing (null, false,
// empty, the default), so a client that relies on one gets a 400 naming
// it instead of an answer that quietly lacks it.
type unsupported struct {
	Functions        json.RawMessage `json:"functions"`
	FunctionCall     json.RawMessage `json:"function_call"`
	Audio            json.RawMessage `json:"audio"`
	Modalities       json.RawMessage `json:"modalities"`
	Prediction       json.RawMessage `json:"prediction"`
	WebSearchOptions json.RawMessage `json:"web_search_options"`
	ReasoningEffort  json.RawMessage `json:"reasoning_effort"`
	Verbosity        json.RawMessage `json:"verbosity"`
	BestOf           json.RawMessage `json:"best_of"` // completions
	Echo             json.RawMessage `json:"echo"`    // completions
	Suffix           json.RawMessage `json:"suffix"`  // completions
}

// ignoredHints are parameters that change nothing of the answer: OpenAI's
// storage, billing and caching hints, and the priority field of vLLM and SGLang (the RFC 9218
// Priority header sets a request's urgency here; an edge h3infer sends the
// field to its upstreams).
type ignoredHints struct {
	Metadata         json.RawMessage `json:"metadata"`
	Store            json.RawMessage `json:"store"`
	ServiceTier      json.RawMessage `json:"service_tier"`
	PromptCacheKey   json.RawMessage `json:"prompt_cache_key"`
	SafetyIdentifier json.RawMessage `json:"safety_identifier"`
	Priority         json.RawMessage `json:"priority"`
}

// asksForNothing lists, per unsupported parameter, the values that leave
// the answer as it would be without it, as compact JSON.
var asksForNothing = map[string][]string{
	"functions":          {"[]"},
	"function_call":      {`"none"`, `"auto"`},
	"modalities":         {`["text"]`},
	"best_of":            {"1"},
	"echo":               {"false"},
	"suffix":             {`""`},
	"audio":              nil,
	"prediction":         nil,
	"web_search_options": nil,
	"reasoning_effort":   nil,
	"verbosity":          nil,
}

// refuseUnsupported refuses the first unsupported parameter u sets to a
// value that asks for something, in the order listed here (an array, so
// that the check allocates nothing on a request that sets none).
func refuseUnsupported(u *unsupported) error {
	for _, p := range [...]struct {
		name string
		raw  json.RawMessage
	}{
		{"functions", u.Functions}, {"function_call", u.FunctionCall}, {"audio", u.Audio},
		{"modalities", u.Modalities}, {"prediction", u.Prediction}, {"web_search_options", u.WebSearchOptions},
		{"reasoning_effort", u.ReasoningEffort}, {"verbosity", u.Verbosity},
		{"best_of", u.BestOf}, {"echo", u.Echo}, {"suffix", u.Suffix},
	} {
		if len(p.raw) == 0 || bytes.Equal(p.raw, []byte("null")) {
			continue
		}
		var compact bytes.Buffer
		if json.Compact(&compact, p.raw) == nil && slices.Contains(asksForNothing[p.name], compact.String()) {
			continue
		}
		return invalidf(p.name, "%s: not supported by this server yet", p.name)
	}
	return nil
}

type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
	// ToolCalls are an assistant message's calls, ToolCallID the call
	// a tool message answers (tools.go).
	ToolCalls  []toolCallParam `json:"tool_calls"`
	ToolCallID *string         `json:"tool_call_id"`
}

// contentPart is one element of an array-valued message content.
type contentPart struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

// completion is a validated request, ready for the scheduler.
type completion struct {
	kind         apiKind
	model        string
	stream       bool
	includeUsage bool
	user         string
	job          infer.Request
	// maxTokensParam is the parameter that set job.MaxTokens, "" when
	// the default did.
	maxTokensParam string
}

const maxStopSequences = 4

var chatRoles = map[string]bool{"system": true, "developer": true, "user": true, "assistant": true, "tool": true}

// parseCompletion decodes and validates a request body. Every refusal names
// the parameter at fault.
func parseCompletion(body []byte, kind apiKind, defaultMaxTokens int) (*completion, error) {
	var req completionRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	err := dec.Decode(&req)
	if name, ok := unknownField(err); ok {
		return nil, invalidf(name, "%s: unknown parameter", name)
	}
	if _, trailing := dec.Token(); err != nil || trailing != io.EOF {
		// A stream decoder reports a body cut short or followed by more
		// as the end of its input; Unmarshal says what is wrong with it.
		if uerr := json.Unmarshal(body, new(any)); uerr != nil {
			err = uerr
		}
		return nil, fmt.Errorf("decode request: %w", err)
	}
	if err := refuseUnsupported(&req.unsupported); err != nil {
		return nil, err
	}
	c := &completion{kind: kind, model: req.Model, stream: req.Stream, user: req.User}
	if req.Model == "" {
		return nil, invalidf("model", "model: required")
	}
	c.job.Model = req.Model

	switch kind {
	case kindChat:
		msgs, err := chatMessages(req.Messages)
		if err != nil {
			return nil, err
		}
		c.job.Messages = msgs
	case kindText:
		p, err := textPrompt(req.Prompt)
		if err != nil {
			return nil, err
		}
		c.job.Prompt = p
	}

	maxTokens, param := int64(defaultMaxTokens), ""
	switch {
	case req.MaxCompletionTokens != nil:
		maxTokens, param = *req.MaxCompletionTokens, "max_completion_tokens"
	case req.MaxTokens != nil:
		maxTokens, param = *req.MaxTokens, "max_tokens"
	}
	if maxTokens < 1 || maxTokens > math.MaxUint32 {
		return nil, invalidf(param, "%s: must be a positive integer, got %d", param, maxTokens)
	}
	c.job.MaxTokens, c.maxTokensParam = uint32(maxTokens), param

	c.job.Temperature = 1 // OpenAI's default; 0 would mean greedy
	if t := req.Temperature; t != nil {
		if math.IsNaN(*t) || *t < 0 || *t > 2 {
			return nil, invalidf("temperature", "temperature: must be between 0 and 2, got %v", *t)
		}
		c.job.Temperature = float32(*t)
	}
	c.job.TopP = 1
	if p := req.TopP; p != nil {
		if math.IsNaN(*p) || *p <= 0 || *p > 1 {
			return nil, invalidf("top_p", "top_p: must be greater than 0 and at most 1, got %v", *p)
		}
		c.job.TopP = float32(*p)
	}
	if err := samplingParams(&req, &c.job); err != nil {
		return nil, err
	}
	if err := logprobsParams(&req, kind, &c.job); err != nil {
		return nil, err
	}
	if req.Seed != nil {
		c.job.Seed, c.job.HasSeed = uint64(*req.Seed), true
	}
	c.job.IgnoreEOS = req.IgnoreEOS
	if req.N != nil {
		if *req.N < 1 || *req.N > infer.MaxChoices {
			return nil, invalidf("n", "n: must be between 1 and %d, got %d", infer.MaxChoices, *req.N)
		}
		c.job.N = uint32(*req.N)
	}
	stop, err := stopSequences(req.Stop)
	if err != nil {
		return nil, err
	}
	c.job.Stop = stop
	if c.job.ResponseFormat, err = responseFormat(req.ResponseFormat); err != nil {
		return nil, err
	}
	if err := toolParams(&req, kind, &c.job); err != nil {
		return nil, err
	}
	if c.job.N > 1 && c.job.Tools != "" && c.job.ToolChoice != infer.ToolNone {
		// Tool calls are answered for one choice: refused, not dropped.
		return nil, invalidf("n", "n: several choices cannot be combined with tools the model may call (tool_choice \"none\" can)")
	}
	if req.StreamOptions != nil {
		if !req.Stream {
			return nil, invalidf("stream_options", "stream_options: only allowed when stream is true")
		}
		c.includeUsage = req.StreamOptions.IncludeUsage
	}
	return c, nil
}

// responseFormat checks a response_format, compiling its schema so that a
// schema the workers would refuse is refused here, with the keyword at
// fault, and returns it compacted for the worker; "" when it asks for
// nothing (absent, null or text).
func responseFormat(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return "", nil
	}
	g, err := constrain.Parse(raw)
	if err != nil {
		return "", invalidf("response_format", "%v", err)
	}
	if g == nil {
		return "", nil
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, raw); err != nil {
		return "", invalidf("response_format", "response_format: %v", err)
	}
	return compact.String(), nil
}

// maxTextLogprobs bounds a text completion's logprobs, as OpenAI does.
const maxTextLogprobs = 5

// logprobsParams reads the logprobs parameters in the shape of kind's
// route: chat's logprobs (a boolean) and top_logprobs (0 to 20, only
// with logprobs), or a text completion's logprobs (0 to 5 alternatives).
func logprobsParams(req *completionRequest, kind apiKind, job *infer.Request) error {
	raw := bytes.TrimSpace(req.Logprobs)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		if req.TopLogprobs != nil && *req.TopLogprobs != 0 {
			return invalidf("top_logprobs", "top_logprobs: requires logprobs to be true")
		}
		return nil
	}
	if kind == kindText {
		if req.TopLogprobs != nil {
			return invalidf("top_logprobs", "top_logprobs: a chat parameter; text completions give their count as logprobs")
		}
		var n int64
		if err := json.Unmarshal(raw, &n); err != nil || n < 0 || n > maxTextLogprobs {
			return invalidf("logprobs", "logprobs: must be an integer from 0 to %d, got %s", maxTextLogprobs, raw)
		}
		job.Logprobs, job.TopLogprobs = true, uint8(n)
		return nil
	}
	if err := json.Unmarshal(raw, &job.Logprobs); err != nil {
		return invalidf("logprobs", "logprobs: must be a boolean, got %s", raw)
	}
	if t := req.TopLogprobs; t != nil {
		switch {
		case *t < 0 || *t > infer.MaxTopLogprobs:
			return invalidf("top_logprobs", "top_logprobs: must be an integer from 0 to %d, got %d", infer.MaxTopLogprobs, *t)
		case *t > 0 && !job.Logprobs:
			return invalidf("top_logprobs", "top_logprobs: requires logprobs to be true")
		}
		job.TopLogprobs = uint8(*t)
	}
	return nil
}

// unknownField is the field encoding/json's DisallowUnknownFields refused,
// which it reports only in its message.
func unknownField(err error) (string, bool) {
	if err == nil {
		return "", false
	}
	name, ok := strings.CutPrefix(err.Error(), `json: unknown field "`)
	if !ok {
		return "", false
	}
	return strings.TrimSuffix(name, `"`), true
}

// maxLogitBias bounds logit_bias's entries: each costs the worker an add
// per decode step.
const maxLogitBias = 1024

// samplingParams checks the sampling parameters past temperature and top_p
// against the ranges OpenAI (the penalties, logit_bias) and vLLM (top_k,
// min_p, repetition_penalty) give them, and sets them on job. The token
// ids of logit_bias are checked against the model's vocabulary where the
// model runs.
func samplingParams(req *completionRequest, job *infer.Request) error {
	if k := req.TopK; k != nil {
		if *k < -1 || *k > math.MaxUint32 {
			return invalidf("top_k", "top_k: must be -1 or 0 (all tokens) or a positive integer, got %d", *k)
		}
		job.TopK = uint32(max(*k, 0))
	}
	for _, p := range []struct {
		name     string
		v        *float64
		lo, hi   float64
		loOpen   bool
		dst      *float32
		describe string
	}{
		{"min_p", req.MinP, 0, 1, false, &job.MinP, "between 0 and 1"},
		{"presence_penalty", req.PresencePenalty, -2, 2, false, &job.PresencePenalty, "between -2 and 2"},
		{"frequency_penalty", req.FrequencyPenalty, -2, 2, false, &job.FrequencyPenalty, "between -2 and 2"},
		{"repetition_penalty", req.RepetitionPenalty, 0, 2, true, &job.RepetitionPenalty, "greater than 0 and at most 2"},
	} {
		if p.v == nil {
			continue
		}
		if v := *p.v; math.IsNaN(v) || v < p.lo || v > p.hi || p.loOpen && v == p.lo {
			return invalidf(p.name, "%s: must be %s, got %v", p.name, p.describe, v)
		}
		*p.dst = float32(*p.v)
	}
	bias, err := logitBias(req.LogitBias)
	if err != nil {
		return err
	}
	job.LogitBias = bias
	return nil
}

// logitBias reads OpenAI's logit_bias: an object from token ids, written
// as decimal strings, to a bias between -100 and 100. null or {} is none.
func logitBias(raw json.RawMessage) ([]infer.LogitBias, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, invalidf("logit_bias", "logit_bias: must be an object from token ids to numbers")
	}
	if len(m) > maxLogitBias {
		return nil, invalidf("logit_bias", "logit_bias: at most %d tokens, got %d", maxLogitBias, len(m))
	}
	out := make([]infer.LogitBias, 0, len(m))
	for k, v := range m {
		id, err := strconv.ParseUint(k, 10, 32)
		if err != nil {
			return nil, invalidf("logit_bias", "logit_bias: keys must be token ids (non-negative integers), got %q", k)
		}
		var b float64
		if err := json.Unmarshal(v, &b); err != nil || math.IsNaN(b) || b < -100 || b > 100 {
			return nil, invalidf("logit_bias", "logit_bias[%q]: must be a number between -100 and 100, got %s", k, v)
		}
		out = append(out, infer.LogitBias{Token: uint32(id), Bias: float32(b)})
	}
	slices.SortFunc(out, func(a, b infer.LogitBias) int { return cmp.Compare(a.Token, b.Token) })
	for i := 1; i < len(out); i++ {
		if out[i].Token == out[i-1].Token {
			return nil, invalidf("logit_bias", "logit_bias: token %d is given twice", out[i].Token)
		}
	}
	return out, nil
}

func chatMessages(in []chatMessage) ([]infer.ChatMessage, error) {
	if len(in) == 0 {
		return nil, invalidf("messages", "messages: at least one message is required")
	}
	out := make([]infer.ChatMessage, len(in))
	for i, m := range in {
		if !chatRoles[m.Role] {
			return nil, invalidf(fmt.Sprintf("messages[%d].role", i),
				"messages[%d].role: must be one of system, developer, user, assistant, tool; got %q", i, m.Role)
		}
		text, err := messageText(m.Content, i)
		if err != nil {
			return nil, err
		}
		out[i] = infer.ChatMessage{Role: m.Role, Content: text}
		if err := messageTools(&out[i], m, i); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// messageText accepts a string or an array of text parts.
func messageText(raw json.RawMessage, i int) (string, error) {
	param := fmt.Sprintf("messages[%d].content", i)
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return "", nil
	}
	var s string
	if raw[0] == '"' {
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", invalidf(param, "%s: %v", param, err)
		}
		return s, nil
	}
	var parts []contentPart
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", invalidf(param, "%s: must be a string or an array of text parts", param)
	}
	var b strings.Builder
	for j, p := range parts {
		if p.Type != "text" {
			return "", invalidf(param, "%s[%d].type: only \"text\" parts are supported, got %q", param, j, p.Type)
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}

// textPrompt accepts a string or an array holding one string.
func textPrompt(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return "", invalidf("prompt", "prompt: required")
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var list []string
	if err := json.Unmarshal(raw, &list); err != nil {
		return "", invalidf("prompt", "prompt: must be a string or an array of one string (token arrays are not supported)")
	}
	if len(list) != 1 {
		return "", invalidf("prompt", "prompt: only one prompt per request is supported, got %d", len(list))
	}
	return list[0], nil
}

// stopSequences accepts null, a string or an array of up to four strings.
func stopSequences(raw json.RawMessage) ([]string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil, nil
	}
	var list []string
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		list = []string{s}
	} else if err := json.Unmarshal(raw, &list); err != nil {
		return nil, invalidf("stop", "stop: must be a string or an array of strings")
	}
	if len(list) > maxStopSequences {
		return nil, invalidf("stop", "stop: at most %d sequences, got %d", maxStopSequences, len(list))
	}
	for i, s := range list {
		if s == "" {
			return nil, invalidf("stop", "stop[%d]: must not be empty", i)
		}
	}
	return list, nil
}
