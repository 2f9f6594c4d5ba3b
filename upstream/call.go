package upstream

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"h3infer/infer"
	"h3infer/priority"
)

// traceContext is the only propagation format h3infer speaks.
var traceContext = propagation.TraceContext{}

// Open starts the request on the upstream and returns its call at once:
// the HTTP exchange runs in a goroutine of the handle's, so Open never
// waits on the network.
func (h *Handle) Open(id uint64, r *infer.Request) (infer.Call, error) {
	h.mu.Lock()
	if h.closed {
		// Retired and closed after the scheduler chose it: another
		// backend may take the request.
		h.mu.Unlock()
		return h.ended(id, &infer.Error{Code: infer.CodeUpstreamLost, Message: "the upstream was removed", Unstarted: true}), nil
	}
	h.inFlight++
	h.requests++
	h.set.wg.Add(1)
	h.mu.Unlock()
	h.m.inFlight.Inc()
	ctx, cancel := context.WithCancelCause(h.ctx)
	c := &call{h: h, id: id, cancel: cancel, events: make(chan infer.Event, h.set.callBuffer+1)}
	job := *r
	go c.run(ctx, &job)
	return c, nil
}

// ended is a call that ends with e before anything is sent.
func (h *Handle) ended(id uint64, e *infer.Error) *call {
	c := &call{h: h, id: id, cancel: func(error) {}, events: make(chan infer.Event, 1)}
	c.finish(infer.Event{Err: e})
	return c
}

// callEnded is the last thing a call's goroutine does.
func (h *Handle) callEnded() {
	h.m.inFlight.Dec()
	h.mu.Lock()
	h.inFlight--
	h.mu.Unlock()
	h.closeIfIdle()
	h.set.wg.Done()
}

// call is one request in flight on an upstream: an infer.Call whose
// events come from the upstream's SSE stream.
type call struct {
	h      *Handle
	id     uint64
	cancel context.CancelCauseFunc

	// mu orders delivery against Cancel: once ended is set nothing more
	// goes on events, which is closed exactly once.
	mu         sync.Mutex
	ended      bool
	cancelled  bool // Cancel ended it
	overflowed bool // its consumer fell behind
	events     chan infer.Event
}

func (c *call) Events() <-chan infer.Event { return c.events }

// Cancel closes the events at once and cancels the HTTP request, which
// resets the upstream's stream (or closes its HTTP/1.1 connection), so
// that the upstream stops generating.
func (c *call) Cancel() {
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return
	}
	c.ended, c.cancelled = true, true
	close(c.events)
	c.mu.Unlock()
	c.cancel(errCancelled)
}

// token hands on tokens' text (and their logprobs) without blocking. It reports false when
// the call has ended: cancelled, or overflowed just now, which ends it
// with infer.CodeOverflow and cancels the request.
func (c *call) token(t infer.Token) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended {
		return false
	}
	if len(c.events) >= cap(c.events)-1 {
		c.ended, c.overflowed = true, true
		c.events <- infer.Event{Err: &infer.Error{
			Code:    infer.CodeOverflow,
			Message: fmt.Sprintf("request %d: consumer fell %d events behind", c.id, cap(c.events)-1),
		}}
		close(c.events)
		c.cancel(errOverflow)
		return false
	}
	c.events <- infer.Event{Token: t}
	return true
}

// finish delivers the terminal event unless the call has ended.
func (c *call) finish(ev infer.Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended {
		return
	}
	c.ended = true
	c.events <- ev
	close(c.events)
}

// result is how an exchange with the upstream ended.
type result struct {
	done   *infer.Done
	err    *infer.Error // nil with done, or when the call already ended
	kind   string       // errors_total's kind; "" for none
	counts bool         // towards ejection
	reason string       // for the log and last_error: the upstream's own words
	tokens uint32
	ttft   time.Duration
}

func (c *call) run(ctx context.Context, job *infer.Request) {
	defer c.h.callEnded()
	defer c.cancel(nil)
	cfg := c.h.cfg
	start := time.Now()
	ctx, span := c.startSpan(ctx, job)
	ctx, stopTimeout := context.WithTimeoutCause(ctx, time.Duration(cfg.Timeout), errTimeout)
	defer stopTimeout()
	ctx, stalled := context.WithCancelCause(ctx)
	defer stalled(nil)
	stall := time.AfterFunc(time.Duration(cfg.StallTimeout), func() { stalled(errStall) })
	defer stall.Stop()
	var r result
	if job.Embed != nil {
		r = c.exchangeEmbed(ctx, job, stall, start)
	} else {
		r = c.exchange(ctx, job, stall, start)
	}
	c.report(ctx, r, span)
}

func (c *call) startSpan(ctx context.Context, job *infer.Request) (context.Context, trace.Span) {
	if job.TraceParent != "" {
		ctx = traceContext.Extract(ctx, propagation.MapCarrier{"traceparent": job.TraceParent})
	}
	prio := "off"
	if p, ok := mapPriority(c.h.cfg.Priority, job.Urgency); ok {
		prio = strconv.Itoa(p)
	}
	return c.h.set.tracer.Start(ctx, "upstream", trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(
			attribute.String("h3infer.upstream.name", c.h.cfg.Name),
			attribute.String("server.address", c.h.host),
			attribute.String("network.protocol.name", c.h.cfg.Protocol),
			attribute.String("h3infer.upstream.priority", prio),
			attribute.Int("h3infer.urgency", int(job.Urgency)),
			attribute.Int64("h3infer.request_id", int64(c.id)),
		))
}

// mapPriority is the request body's priority field for urgency u under
// mapping, and false when the field is left out.
func mapPriority(mapping string, u priority.Urgency) (int, bool) {
	switch mapping {
	case PriorityLowerFirst:
		return int(u), true
	case PriorityHigherFirst:
		return int(priority.Least - u), true
	}
	return 0, false
}

// completionBody is the request upstream, for both endpoints.
type completionBody struct {
	Model       string        `json:"model"`
	Messages    []chatMessage `json:"messages,omitempty"`
	Prompt      *string       `json:"prompt,omitempty"`
	MaxTokens   uint32        `json:"max_tokens,omitempty"`
	Temperature float32       `json:"temperature"`
	TopP        float32       `json:"top_p,omitempty"`
	// Sampling beyond temperature and top_p: the penalties under
	// OpenAI's names, the rest under vLLM's and SGLang's; each is sent
	// only when it asks for something.
	TopK              uint32             `json:"top_k,omitempty"`
	MinP              float32            `json:"min_p,omitempty"`
	PresencePenalty   float32            `json:"presence_penalty,omitempty"`
	FrequencyPenalty  float32            `json:"frequency_penalty,omitempty"`
	RepetitionPenalty float32            `json:"repetition_penalty,omitempty"`
	LogitBias         map[string]float32 `json:"logit_bias,omitempty"`
	Seed              *uint64            `json:"seed,omitempty"`
	Stop              []string           `json:"stop,omitempty"`
	Stream            bool               `json:"stream"`
	StreamOptions     struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	IgnoreEOS bool `json:"ignore_eos,omitempty"`
	Priority  *int `json:"priority,omitempty"`
	// ResponseFormat goes as the client wrote it: the engine upstream
	// enforces it (vLLM and SGLang take OpenAI's shape on both routes).
	ResponseFormat json.RawMessage `json:"response_format,omitempty"`
	// Logprobs is chat's boolean, or a text completion's count of
	// alternatives; TopLogprobs chat's count. Each route's own shape, as
	// the client wrote it to the gateway.
	Logprobs    any    `json:"logprobs,omitempty"`
	TopLogprobs *uint8 `json:"top_logprobs,omitempty"`
	// N is the choices asked for, sent when more than one: each comes
	// back under its index.
	N uint32 `json:"n,omitempty"`
	// Tools go as the gateway checked them, with the choice among them.
	Tools             json.RawMessage `json:"tools,omitempty"`
	ToolChoice        any             `json:"tool_choice,omitempty"`
	ParallelToolCalls *bool           `json:"parallel_tool_calls,omitempty"`
}

type chatMessage struct {
	Role       string         `json:"role"`
	Content    *string        `json:"content"`
	ToolCalls  []wireToolCall `json:"tool_calls,omitempty"`
	ToolCallID string         `json:"tool_call_id,omitempty"`
}

func (c *call) newRequest(ctx context.Context, job *infer.Request) (*http.Request, error) {
	b := completionBody{
		Model:       modelName(job.Model),
		MaxTokens:   job.MaxTokens,
		Temperature: job.Temperature,
		TopP:        job.TopP,
		TopK:        job.TopK,
		MinP:        job.MinP,
		Stop:        job.Stop,
		Stream:      true,
		IgnoreEOS:   job.IgnoreEOS,

		PresencePenalty:  job.PresencePenalty,
		FrequencyPenalty: job.FrequencyPenalty,
	}
	if r := job.RepetitionPenalty; r != 0 && r != 1 {
		b.RepetitionPenalty = r
	}
	if len(job.LogitBias) > 0 {
		// Token ids are the model's: the same model upstream has the same
		// vocabulary.
		b.LogitBias = make(map[string]float32, len(job.LogitBias))
		for _, lb := range job.LogitBias {
			b.LogitBias[strconv.FormatUint(uint64(lb.Token), 10)] = lb.Bias
		}
	}
	if job.ResponseFormat != "" {
		b.ResponseFormat = json.RawMessage(job.ResponseFormat)
	}
	b.StreamOptions.IncludeUsage = true
	if job.N > 1 {
		b.N = job.N
	}
	if job.Tools != "" {
		b.Tools = json.RawMessage(job.Tools)
	}
	b.ToolChoice = toolChoice(job)
	if job.SerialToolCalls {
		b.ParallelToolCalls = new(false)
	}
	if job.Logprobs {
		b.Logprobs = job.TopLogprobs
		if len(job.Messages) > 0 {
			b.Logprobs, b.TopLogprobs = true, &job.TopLogprobs
		}
	}
	path := "/v1/completions"
	if len(job.Messages) > 0 {
		path = "/v1/chat/completions"
		b.Messages = make([]chatMessage, len(job.Messages))
		for i, m := range job.Messages {
			b.Messages[i] = upstreamMessage(m)
		}
	} else {
		b.Prompt = &job.Prompt
	}
	if job.HasSeed {
		b.Seed = &job.Seed
	}
	if p, ok := mapPriority(c.h.cfg.Priority, job.Urgency); ok {
		b.Priority = &p
	}
	body, err := json.Marshal(&b)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.h.base+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("User-Agent", "h3infer-upstream")
	// RFC 9218: an upstream h3infer schedules by it; others ignore it.
	req.Header.Set("Priority", "u="+strconv.Itoa(int(job.Urgency)))
	c.h.authorize(req)
	traceContext.Inject(ctx, propagation.HeaderCarrier(req.Header))
	return req, nil
}

// exchange sends the request and turns the answer into events.
func (c *call) exchange(ctx context.Context, job *infer.Request, stall *time.Timer, start time.Time) result {
	req, err := c.newRequest(ctx, job)
	if err != nil {
		return result{err: &infer.Error{Code: infer.CodeInternal, Message: "could not build the upstream request"}, reason: err.Error()}
	}
	resp, err := c.h.client.Do(req)
	if err != nil {
		return c.lost(ctx, err, false)
	}
	defer resp.Body.Close() // before the end of the stream: resets it
	stall.Reset(time.Duration(c.h.cfg.StallTimeout))
	if resp.StatusCode != http.StatusOK {
		return c.refused(resp, modelName(job.Model))
	}
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt != "text/event-stream" {
		return result{
			err:  &infer.Error{Code: infer.CodeUpstreamLost, Message: "the upstream server did not answer with an event stream", Unstarted: true},
			kind: kindMalformed, counts: true, reason: fmt.Sprintf("answered %q, not text/event-stream", resp.Header.Get("Content-Type")),
		}
	}
	calls, err := newCallReader(job)
	if err != nil {
		return result{err: &infer.Error{Code: infer.CodeInternal, Message: "could not read the request's tools"}, reason: err.Error()}
	}
	return c.stream(ctx, resp.Body, shape{chat: len(job.Messages) > 0, logprobs: job.Logprobs, top: int(job.TopLogprobs), choices: max(job.N, 1), calls: calls}, stall, start)
}

// lost classifies a failed exchange: by its context's cause when the
// gateway ended it, else as a broken connection. started says whether a
// token went out; before one, another backend may take the request.
func (c *call) lost(ctx context.Context, err error, started bool) result {
	cause := context.Cause(ctx)
	e := &infer.Error{Code: infer.CodeUpstreamLost, Unstarted: !started}
	switch {
	case errors.Is(cause, errCancelled), errors.Is(cause, errOverflow):
		return result{} // the call has ended already
	case errors.Is(cause, errStall):
		e.Code, e.Message = infer.CodeTimeout, fmt.Sprintf("the upstream server sent nothing for %s", c.h.cfg.StallTimeout)
		return result{err: e, kind: kindStall, counts: true, reason: e.Message}
	case errors.Is(cause, errTimeout):
		e.Code, e.Message = infer.CodeTimeout, fmt.Sprintf("the upstream request took longer than %s", c.h.cfg.Timeout)
		return result{err: e, kind: kindTimeout, reason: e.Message}
	case errors.Is(cause, errClosed), errors.Is(cause, errRetired):
		e.Message = "the gateway closed its upstream connection"
		return result{err: e, reason: e.Message}
	}
	kind := kindConnect
	e.Message = "the connection to the upstream server failed"
	if started {
		kind, e.Message = kindStream, "the upstream server's stream broke"
	}
	return result{err: e, kind: kind, counts: true, reason: err.Error()}
}

// refused turns a status other than 200 into the error it means.
func (c *call) refused(resp *http.Response, model string) result {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	msg := errorMessage(body)
	status := resp.StatusCode
	reason := fmt.Sprintf("status %d: %s", status, msg)
	e := &infer.Error{Code: infer.CodeUpstreamLost, Unstarted: true}
	r := result{err: e, reason: reason}
	switch {
	case status == http.StatusTooManyRequests:
		e.Code, e.Message = infer.CodeRateLimited, "the upstream server is limiting requests"
		e.RetryAfter = retryAfter(resp.Header.Get("Retry-After"), time.Now())
		r.kind = kindRateLimited
	case status == http.StatusServiceUnavailable:
		e.Code, e.Message = infer.CodeOverloaded, "the upstream server is overloaded"
		e.RetryAfter = retryAfter(resp.Header.Get("Retry-After"), time.Now())
		r.kind = kindOverloaded
	case status == http.StatusNotFound && model != "" && bytes.Contains(body, []byte(model)):
		e.Code, e.Message = infer.CodeModelNotFound, fmt.Sprintf("the upstream server does not serve %q", model)
		r.kind = kindModelNotFound
	case status == http.StatusBadRequest || status == http.StatusUnprocessableEntity:
		// Every backend would refuse it: the client hears why.
		e.Code, e.Message, e.Unstarted = infer.CodeInvalidRequest, msg, false
		if errorCode(body) == infer.CodeContextLength || strings.Contains(strings.ToLower(msg), "context length") {
			e.Code = infer.CodeContextLength
		}
		r.kind = kindInvalid
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		e.Message = "the upstream server refused the gateway's credential"
		r.kind = kindAuth
	case status >= 500:
		e.Message = fmt.Sprintf("the upstream server failed (status %d)", status)
		r.kind, r.counts = kindStatus, true
	default:
		e.Message = fmt.Sprintf("the upstream server answered status %d", status)
		r.kind = kindStatus
	}
	return r
}

// stream reads the SSE stream: each data field's JSON is a chunk, and
// "[DONE]" the end.
//
// Tokens that arrive together go on as one event: while the next event
// has arrived whole already, a token waits for it, and the tokens go out
// when nothing more is at hand, before the reader waits. An upstream that
// coalesces its writes (h3infer does, for all but urgent streams) thus
// costs the gateway one event per write rather than one per token, and
// no token waits for anything that has not arrived.
func (c *call) stream(ctx context.Context, body io.Reader, sh shape, stall *time.Timer, start time.Time) result {
	br := bufio.NewReaderSize(body, 16<<10)
	var (
		held     infer.Token // tokens not yet handed on, of one choice
		heldText []byte
	)
	// handOn delivers the held tokens; false: the call has ended.
	handOn := func() bool {
		if held.Count == 0 && held.FinishReason == "" && len(held.ToolCalls) == 0 {
			return true
		}
		held.Text = string(heldText)
		ok := c.token(held)
		held, heldText = infer.Token{}, heldText[:0]
		return ok
	}
	r := c.readEvents(ctx, br, sh, stall, start, func(t infer.Token) bool {
		// Only a choice's tokens run together, and none after its end.
		if (held.Count > 0 || held.FinishReason != "" || len(held.ToolCalls) > 0) && (t.Index != held.Index || held.FinishReason != "") && !handOn() {
			return false
		}
		heldText = append(heldText, t.Text...)
		held.Index, held.Count, held.FinishReason = t.Index, held.Count+t.Count, t.FinishReason
		held.Logprobs = append(held.Logprobs, t.Logprobs...)
		held.ToolCalls = append(held.ToolCalls, t.ToolCalls...)
		// An upstream that writes faster than the gateway reads always
		// has the next event at hand: the held tokens go on at a bound
		// all the same, so that one event never grows without end.
		if nextEventArrived(br) && held.Count < maxHeldTokens && len(heldText) < maxHeldText {
			return true
		}
		return handOn()
	})
	// Tokens before the end go on before it (report delivers the end).
	handOn()
	return r
}

// Bounds of the tokens stream holds together as one event.
const (
	maxHeldTokens = 256
	maxHeldText   = 64 << 10
)

// nextEventArrived reports whether br holds a whole further event: a
// blank line ends one.
func nextEventArrived(br *bufio.Reader) bool {
	b, _ := br.Peek(br.Buffered())
	return bytes.Contains(b, []byte("\n\n")) || bytes.Contains(b, []byte("\r\n\r\n"))
}

// readEvents reads the stream's events and hands each chunk's tokens to
// token (their text, their logprobs when sh asks for them, how many there
// are and, for a request with several choices, the choice's index and,
// with its last, why it ended), which returns false once the call has
// ended.
//
// Without logprobs, a chunk with text is one token, as servers send them.
// With them, the logprobs count the tokens, and a chunk may carry some
// with no text (h3infer sends the logprobs of tokens whose text it held
// back with the end); text without logprobs is an upstream that ignored
// the parameter, which ends the request rather than answer without them.
func (c *call) readEvents(ctx context.Context, br *bufio.Reader, sh shape, stall *time.Timer, start time.Time, token func(infer.Token) bool) result {
	stallFor := time.Duration(c.h.cfg.StallTimeout)
	var (
		data    []byte
		hasData bool
		count   uint32
		finish  string
		usage   *infer.Done
		ttft    time.Duration
	)
	malformed := func(reason string) result {
		return result{
			err:  &infer.Error{Code: infer.CodeUpstreamLost, Message: "the upstream server sent a malformed stream", Unstarted: count == 0},
			kind: kindMalformed, counts: true, reason: reason, tokens: count, ttft: ttft,
		}
	}
	// dispatch acts on one event; it returns the result that ends the
	// exchange, or nil to go on.
	dispatch := func(data []byte) *result {
		if string(data) == "[DONE]" {
			d := &infer.Done{FinishReason: finish, CompletionTokens: count}
			if d.FinishReason == "" {
				d.FinishReason = infer.FinishStop
			}
			if usage != nil {
				d.PromptTokens, d.CompletionTokens = usage.PromptTokens, usage.CompletionTokens
			}
			return &result{done: d, tokens: count, ttft: ttft}
		}
		var ch chunk
		if err := decodeChunk(data, &ch); err != nil {
			r := malformed("event is not a JSON chunk: " + err.Error())
			return &r
		}
		if len(ch.Error) > 0 && string(ch.Error) != "null" {
			r := streamError(ch.Error, count > 0)
			r.tokens, r.ttft = count, ttft
			return &r
		}
		if ch.Usage != nil {
			usage = &infer.Done{PromptTokens: ch.Usage.PromptTokens, CompletionTokens: ch.Usage.CompletionTokens}
		}
		if len(ch.Choices) == 0 {
			return nil
		}
		for _, ch := range ch.Choices {
			if r := c.choice(ch, sh, &count, &finish, &ttft, start, token); r != nil {
				r.tokens, r.ttft = count, ttft
				return r
			}
		}
		return nil
	}
	for {
		line, err := readLine(br, maxLine, func() { stall.Reset(stallFor) })
		if err == io.EOF && hasData {
			// The stream ended without the blank line that ends an
			// event: act on the event it did send.
			if r := dispatch(data); r != nil {
				return *r
			}
		}
		switch {
		case errors.Is(err, errLineTooLong):
			return malformed(err.Error())
		case err == io.EOF:
			return result{
				err:  &infer.Error{Code: infer.CodeUpstreamLost, Message: "the upstream server's stream ended early", Unstarted: count == 0},
				kind: kindStream, counts: true, reason: "stream ended without [DONE]", tokens: count, ttft: ttft,
			}
		case err != nil:
			r := c.lost(ctx, err, count > 0)
			r.tokens, r.ttft = count, ttft
			return r
		}
		stall.Reset(stallFor)
		if len(line) == 0 {
			if hasData {
				if r := dispatch(data); r != nil {
					return *r
				}
			}
			data, hasData = data[:0], false
			continue
		}
		field, value, _ := bytes.Cut(line, []byte(":"))
		if string(field) != "data" {
			continue // a comment (keep-alive), event, id or retry
		}
		value = bytes.TrimPrefix(value, []byte(" "))
		if hasData {
			data = append(data, '\n')
		}
		data, hasData = append(data, value...), true
		if len(data) > maxLine {
			return malformed(errLineTooLong.Error())
		}
	}
}

// choice acts on one choice of a chunk: it hands on the choice's tokens
// and counts them into count, and returns the result that ends the
// exchange, or nil to go on. finish is choice 0's finish reason, the
// request's.
func (c *call) choice(ch choice, sh shape, count *uint32, finish *string, ttft *time.Duration, start time.Time, token func(infer.Token) bool) *result {
	malformed := func(reason string) *result {
		return &result{
			err:  &infer.Error{Code: infer.CodeUpstreamLost, Message: "the upstream server sent a malformed stream", Unstarted: *count == 0},
			kind: kindMalformed, counts: true, reason: reason,
		}
	}
	if ch.Index >= sh.choices {
		return malformed(fmt.Sprintf("choice %d of a request for %d", ch.Index, sh.choices))
	}
	if ch.Index == 0 && ch.FinishReason != "" {
		*finish = ch.FinishReason
	}
	t := infer.Token{Text: ch.Text, Count: 1}
	if sh.chat {
		t.Text = ch.Delta.Content
	}
	if sh.logprobs {
		var err error
		if t.Logprobs, err = chunkLogprobs(ch.Logprobs, sh); err != nil {
			return malformed(err.Error())
		}
		if t.Text != "" && len(t.Logprobs) == 0 {
			r := malformed(errNoLogprobs.Error())
			r.err.Code, r.err.Message, r.counts = infer.CodeInvalidRequest, "logprobs: the upstream server did not return them", false
			return r
		}
		t.Count = uint32(len(t.Logprobs))
	}
	calls, err := sh.calls.read(ch.Delta.ToolCalls)
	if err != nil {
		return malformed(err.Error())
	}
	t.ToolCalls = calls
	if t.Text == "" && len(calls) == 0 && (t.Count == 0 || !sh.logprobs) {
		// A role-only first chunk, or a chunk that only finishes: with
		// several choices, each one's end goes on as it comes.
		t.Count = 0
	}
	if sh.choices > 1 {
		t.Index, t.FinishReason = ch.Index, ch.FinishReason
	}
	if t.Count == 0 && t.FinishReason == "" && len(t.ToolCalls) == 0 {
		return nil
	}
	if *count == 0 && t.Count > 0 {
		*ttft = time.Since(start)
		c.h.m.ttft.Observe(ttft.Seconds())
	}
	*count += t.Count
	if !token(t) {
		return &result{kind: kindOverflow} // or cancelled; report tells
	}
	return nil
}

// streamError is the result of an error event in the stream: the code it
// names when it is one of infer's a client may see, else upstream_lost.
func streamError(raw json.RawMessage, started bool) result {
	msg, code := apiErrorFields(raw)
	e := &infer.Error{Code: infer.CodeUpstreamLost, Message: "the upstream server failed: " + msg, Unstarted: !started}
	switch code {
	case infer.CodeContextLength, infer.CodeInvalidRequest:
		e.Code, e.Message, e.Unstarted = code, msg, false
	case infer.CodeModelNotFound, infer.CodeRateLimited, infer.CodeOverloaded, infer.CodeTimeout:
		e.Code, e.Message = code, msg
	}
	return result{err: e, kind: kindUpstreamError, reason: "error event: " + msg}
}

// report counts the exchange's end, ends its span and, last, delivers
// its terminal event, so that whoever reads it finds everything counted.
func (c *call) report(ctx context.Context, r result, span trace.Span) {
	h := c.h
	c.mu.Lock()
	cancelled, overflowed := c.cancelled, c.overflowed
	c.mu.Unlock()
	span.SetAttributes(attribute.Int("h3infer.tokens", int(r.tokens)))
	switch {
	case cancelled:
		h.m.cancelled.Inc()
		h.m.requests.WithLabelValues(outcomeCancelled).Inc()
		span.AddEvent("cancelled")
		span.End()
		return
	case r.done != nil:
		h.m.requests.WithLabelValues(outcomeOK).Inc()
		h.succeed(r.ttft)
		span.SetAttributes(attribute.String("h3infer.finish_reason", r.done.FinishReason),
			attribute.Int("h3infer.prompt_tokens", int(r.done.PromptTokens)),
			attribute.Int("h3infer.completion_tokens", int(r.done.CompletionTokens)))
		span.End()
		c.finish(infer.Event{Done: r.done})
		return
	case overflowed:
		r.kind, r.reason = kindOverflow, "the consumer fell behind"
	}
	h.m.requests.WithLabelValues(outcomeError).Inc()
	code := infer.CodeOverflow
	if r.err != nil {
		code = r.err.Code
	}
	span.SetStatus(codes.Error, code)
	span.End()
	if r.kind != "" {
		h.fail(r.kind, r.reason, r.counts)
	}
	level := slog.LevelWarn
	if r.kind == kindAuth {
		level = slog.LevelError // every request will fail until someone fixes the credential
	}
	h.set.log.Log(ctx, level, "upstream request failed", "upstream", h.cfg.Name, "request_id", c.id,
		"code", code, "kind", r.kind, "tokens", r.tokens, "reason", bound(r.reason, maxMessage))
	if r.err != nil {
		c.finish(infer.Event{Err: r.err})
	}
}

// errLineTooLong ends a stream with a line longer than maxLine.
var errLineTooLong = fmt.Errorf("stream line longer than %d bytes", maxLine)

// readLine reads one line without its end (LF or CRLF), refusing one
// longer than limit instead of buffering it whole. It calls progress
// whenever a long line's next part arrives: a line still arriving is not
// a stall.
func readLine(r *bufio.Reader, limit int, progress func()) ([]byte, error) {
	line, err := r.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		buf := append([]byte(nil), line...)
		for err == bufio.ErrBufferFull {
			if len(buf) > limit {
				return nil, errLineTooLong
			}
			progress()
			line, err = r.ReadSlice('\n')
			buf = append(buf, line...)
		}
		line = buf
	}
	if len(line) > limit+2 {
		return nil, errLineTooLong
	}
	if err != nil && (err != io.EOF || len(line) == 0) {
		return nil, err
	}
	line = bytes.TrimSuffix(line, []byte("\n"))
	return bytes.TrimSuffix(line, []byte("\r")), nil
}

// retryAfter reads a Retry-After header, seconds or an HTTP date, bounded
// to maxRetryAfter; 0 when absent or unreadable.
func retryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	var d time.Duration
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		d = time.Duration(min(n, int64(maxRetryAfter/time.Second))) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = t.Sub(now).Round(time.Second)
	}
	return min(max(d, 0), maxRetryAfter)
}

// errorMessage is the message of an error body in the shapes servers
// write ({"error": {"message"}}, {"error": "..."}, vLLM's {"message"},
// FastAPI's {"detail"}), or the body itself, bounded.
func errorMessage(body []byte) string {
	var top struct {
		Error   json.RawMessage `json:"error"`
		Message string          `json:"message"`
		Detail  json.RawMessage `json:"detail"`
	}
	msg := string(body)
	if json.Unmarshal(body, &top) == nil {
		var s string
		switch {
		case len(top.Error) > 0 && string(top.Error) != "null":
			msg, _ = apiErrorFields(top.Error)
		case top.Message != "":
			msg = top.Message
		case len(top.Detail) > 0 && json.Unmarshal(top.Detail, &s) == nil:
			msg = s
		case len(top.Detail) > 0:
			msg = string(top.Detail)
		}
	}
	return bound(strings.TrimSpace(msg), maxMessage)
}

// errorCode is the code an error body names, "" when none.
func errorCode(body []byte) string {
	var top struct {
		Error json.RawMessage `json:"error"`
	}
	if json.Unmarshal(body, &top) != nil || len(top.Error) == 0 {
		return ""
	}
	_, code := apiErrorFields(top.Error)
	return code
}

// apiErrorFields reads an "error" value: an object with message and code
// (a string; a number, as vLLM writes the status, is no code), or a
// string.
func apiErrorFields(raw json.RawMessage) (msg, code string) {
	var obj struct {
		Message string          `json:"message"`
		Code    json.RawMessage `json:"code"`
	}
	if json.Unmarshal(raw, &obj) == nil {
		_ = json.Unmarshal(obj.Code, &code)
		return bound(obj.Message, maxMessage), code
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return bound(s, maxMessage), ""
	}
	return bound(string(raw), maxMessage), ""
}

// bound cuts s to at most n bytes on a character boundary, marking the
// cut, and replaces what is not UTF-8.
func bound(s string, n int) string {
	if len(s) > n {
		for n > 0 && !utf8.RuneStart(s[n]) {
			n--
		}
		s = s[:n] + "…"
	}
	return strings.ToValidUTF8(s, "\uFFFD")
}
