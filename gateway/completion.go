package gateway

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"h3infer/infer"
	"h3infer/priority"
	"h3infer/scheduler"
)

// The completion routes, POST /v1/chat/completions and /v1/completions:
// parsing and admitting a request, submitting it to the scheduler, waiting
// for the worker's events with the tenant's output-token pacing, and
// answering with one JSON object or a stream of server-sent events.

// serveCompletion runs one chat or text completion in steps: parse the
// request, admit it under the tenant's rate limits, route it to a model
// version, submit it to the scheduler, wait for the worker's first event,
// respond. It commits the response status only after that first event, so
// that a request the worker refuses (too long for the context, say) still
// gets a proper status.
func (g *Gateway) serveCompletion(w http.ResponseWriter, r *http.Request, kind apiKind) {
	run := &inflight{start: time.Now()}
	if err := g.parseRequest(w, r, kind, run); err != nil {
		writeError(w, err)
		return
	}
	ctx, end := g.lifetime(r, run)
	defer end()
	defer g.finished(ctx, run)

	if err := g.admit(ctx, w, r, run); err != nil {
		writeError(w, err)
		return
	}
	// A stream gives back its unused tokens before its end reaches the
	// client (relay); this catches every other way a request ends.
	defer func() { run.adm.release(ctx, run.tokens) }()

	model, done, err := g.route(w, r, run)
	if err != nil {
		writeError(w, err)
		return
	}
	// versionFailed says whether the routed version failed the request
	// before its first token, for the per-version metrics.
	versionFailed := true
	defer func() { done(versionFailed) }()

	if err := g.submit(ctx, run, model); err != nil {
		writeError(w, err)
		return
	}
	// Closing cancels the worker's sequence if the client left early.
	defer run.dispatch.Close()

	ev, err := g.firstEvent(ctx, run)
	if err != nil {
		writeError(w, err)
		return
	}
	// The first token arrived: the version served the request.
	versionFailed = false
	g.respond(ctx, w, run, ev)
}

// lifetime is the context request r runs in: until its deadline or, at
// the end of a shutdown's grace, until the shutdown ends it with an error
// saying so rather than cutting it off with its connection. end releases
// it.
func (g *Gateway) lifetime(r *http.Request, run *inflight) (ctx context.Context, end func()) {
	ctx, cancel := context.WithDeadlineCause(r.Context(), run.deadline, errDeadlinePassed)
	ctx, cancelAbort := context.WithCancelCause(ctx)
	stopAbort := context.AfterFunc(g.aborting, func() { cancelAbort(context.Cause(g.aborting)) })
	return ctx, func() {
		stopAbort()
		cancelAbort(nil)
		cancel()
	}
}

// urgencyLabel is the metric label of an urgency, 0..7.
func urgencyLabel(u priority.Urgency) string { return strconv.Itoa(int(u)) }

// inflight is one completion request as serveCompletion's steps hand it
// on, from its arrival to its end.
type inflight struct {
	req      *completion
	start    time.Time // arrival
	deadline time.Time // when it must have finished
	// prio is what the client asked for until submit, then what the
	// scheduler decided: the tenant's default and ceiling may change the
	// urgency. class is the scheduler's too.
	prio        priority.Signal
	class       priority.Class
	ceiling     priority.Urgency // the highest urgency the caller's token allows
	tenant      string
	adm         *admission
	dispatch    Dispatch
	labels      [2]string // model, urgency
	first, last time.Time // arrival of the first and latest token events
	// interToken is the inter-token histogram of labels, looked up once
	// at the first token rather than hashed again for every token.
	interToken prometheus.Observer
	tokens     int
}

// parseRequest reads and checks the request into run: its method, its
// body within MaxBodyBytes, the model, what the caller's token allows, and
// the Priority and deadline headers.
func (g *Gateway) parseRequest(w http.ResponseWriter, r *http.Request, kind apiKind, run *inflight) error {
	if r.Method != http.MethodPost {
		return &methodNotAllowed{method: r.Method, allow: http.MethodPost}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, g.cfg.MaxBodyBytes))
	if err != nil {
		if _, tooLarge := errors.AsType[*http.MaxBytesError](err); !tooLarge && r.Context().Err() == nil {
			err = invalidf("", "reading the request body: %v", err)
		}
		return err
	}
	req, err := parseCompletion(body, kind, g.cfg.DefaultMaxTokens)
	if err != nil {
		return err
	}
	if err := g.checkModel(req.model); err != nil {
		return err
	}
	if err := g.refuseEncoder(req.model); err != nil {
		return err
	}
	// The token limits the models and caps the urgency (auth.go).
	ceiling, err := identify(r.Context(), req.model)
	if err != nil {
		return err
	}
	prio := priority.Parse(r.Header.Values("Priority"))
	deadline, err := g.deadlineOf(r.Header, run.start)
	if err != nil {
		return err
	}
	run.req, run.deadline, run.prio, run.ceiling = req, deadline, prio, ceiling
	run.labels = [2]string{req.model, urgencyLabel(prio.Urgency)}
	run.last = run.start
	return nil
}

// finished records the request's duration and, on its span, the tokens it
// received and its time to first token.
func (g *Gateway) finished(ctx context.Context, run *inflight) {
	g.metrics.duration.WithLabelValues(run.labels[:]...).Observe(sinceSeconds(run.start))
	span := trace.SpanFromContext(ctx)
	if span.IsRecording() {
		span.SetAttributes(attribute.Int("h3infer.completion_tokens", run.tokens))
		if !run.first.IsZero() {
			span.SetAttributes(attribute.Float64("h3infer.time_to_first_token_s", run.first.Sub(run.start).Seconds()))
		}
	}
}

// admit names the request's tenant and checks the tenant's rate limits,
// reserving the request's max_tokens where the tenant has a tokens-per-
// minute limit. When the limit store cannot answer, the request is
// admitted. The caller releases run.adm when the request ends.
func (g *Gateway) admit(ctx context.Context, w http.ResponseWriter, r *http.Request, run *inflight) error {
	run.tenant = g.cfg.Tenant(r)
	// Each choice may use up to max_tokens.
	adm, err := g.limits.Load().admit(ctx, run.tenant, int(run.req.job.MaxTokens)*run.req.job.Slots(), w.Header())
	if err != nil {
		if lim, ok := errors.AsType[*rateLimited](err); ok {
			g.refused(ctx, lim)
			return err
		}
		if over, ok := errors.AsType[*overBurst](err); ok {
			if n := run.req.job.N; n > 1 {
				return invalidf("n", "n: %d choices of up to %d tokens each reserve %d tokens, over the %d this tenant may reserve at once", n, run.req.job.MaxTokens, over.tokens, over.burst)
			}
			param := run.req.maxTokensParam
			if param == "" {
				return invalidf("max_tokens", "max_tokens: not given, and the default of %d exceeds the %d tokens this tenant may reserve at once; ask for at most %d", over.tokens, over.burst, over.burst)
			}
			return invalidf(param, "%s: %d exceeds the %d tokens this tenant may reserve at once", param, over.tokens, over.burst)
		}
		g.log.Warn("rate limit not checked; admitting", "tenant", run.tenant, "err", err)
	}
	run.adm = adm
	return nil
}

// route names the model the workers serve the request with: the version
// the Router picks, named in the response header, or without a Router the
// model asked for. done must be called when the request ends.
func (g *Gateway) route(w http.ResponseWriter, r *http.Request, run *inflight) (model string, done func(failed bool), err error) {
	if g.cfg.Router == nil {
		return run.req.job.Model, func(bool) {}, nil
	}
	key := run.req.user
	if key == "" {
		key = run.tenant
	}
	target, ver, done, err := g.cfg.Router.Route(run.req.model, key, r.Header.Get(VersionHeader))
	if err != nil {
		return "", nil, err
	}
	if ver != "" {
		w.Header().Set(VersionHeader, ver)
	}
	return target, done, nil
}

// submit queues the request with the scheduler, under an admission span,
// and sets run.dispatch to its Dispatch. The scheduler decides the urgency,
// applying the tenant's default and ceiling, and the class; run's
// priority, class and metric labels follow what it decided.
func (g *Gateway) submit(ctx context.Context, run *inflight, model string) error {
	job := run.req.job
	job.Model = model
	job.TraceParent = traceParent(ctx)
	qctx, qspan := g.tracer.Start(ctx, "admission")
	sreq := &scheduler.Request{
		Tenant:         run.tenant,
		Urgency:        run.prio.Urgency,
		DefaultUrgency: !run.prio.HasUrgency,
		UrgencyCeiling: run.ceiling,
		Deadline:       run.deadline,
		Job:            job,
	}
	st, decided, err := g.sched.Submit(qctx, sreq)
	run.prio.Urgency, run.class = decided.Urgency, decided.Class
	run.labels[1] = urgencyLabel(run.prio.Urgency)
	g.metrics.queueWait.WithLabelValues(run.labels[:]...).Observe(sinceSeconds(run.start))
	if err != nil {
		err = deadlineCause(ctx, err)
		qspan.RecordError(err)
		qspan.SetStatus(codes.Error, "not admitted")
		qspan.End()
		return err
	}
	qspan.End()
	if span := trace.SpanFromContext(ctx); span.IsRecording() {
		attrs := []attribute.KeyValue{
			attribute.Int64("h3infer.request_id", int64(st.ID())),
			attribute.String("h3infer.tenant", run.tenant),
			attribute.Int("h3infer.urgency", int(run.prio.Urgency)),
		}
		if wk, ok := st.(interface{ BackendID() int }); ok {
			attrs = append(attrs, attribute.Int("h3infer.worker", wk.BackendID()))
		}
		span.AddEvent("dispatched", trace.WithAttributes(attrs...))
	}
	run.dispatch = st
	return nil
}

// firstEvent waits for the worker's first event: a token, or the end of an
// answer without one. The response status is not committed yet, so an
// error here gets its own.
func (g *Gateway) firstEvent(ctx context.Context, run *inflight) (infer.Event, error) {
	ev, err := g.next(ctx, run)
	if err != nil {
		err = deadlineCause(ctx, err)
		if !errors.Is(err, context.Canceled) {
			g.log.Debug("request failed before its first token", "request_id", run.dispatch.ID(), "err", err)
		}
		failed(ctx, err)
		return ev, err
	}
	return ev, nil
}

// respond answers with the completion from its first event ev on: as
// server-sent events when the client asked for a stream, else as one JSON
// object.
func (g *Gateway) respond(ctx context.Context, w http.ResponseWriter, run *inflight, ev infer.Event) {
	enc := newEncoder(run.req.kind, run.req.model, run.start.Unix())
	if run.req.job.N > 1 {
		g.respondChoices(ctx, w, run, enc, ev)
		return
	}
	if run.req.stream {
		g.stream(ctx, w, run, enc, ev)
		return
	}
	g.collect(ctx, w, run, enc, ev)
}

// refused counts a rate-limit refusal and marks the trace.
func (g *Gateway) refused(ctx context.Context, lim *rateLimited) {
	g.metrics.refusals.WithLabelValues(g.limits.Load().tenantLabel(lim.tenant), lim.limit).Inc()
	trace.SpanFromContext(ctx).AddEvent("rate_limited", trace.WithAttributes(attribute.String("h3infer.limit", lim.limit)))
}

// failed marks the request's span with why it ended early. err is what
// deadlineCause made of it: a passed deadline is a failure, only the
// client leaving is a cancellation.
func failed(ctx context.Context, err error) {
	span := trace.SpanFromContext(ctx)
	if !span.IsRecording() {
		return
	}
	if errors.Is(err, context.Canceled) {
		span.AddEvent("cancelled", trace.WithAttributes(attribute.String("reason", "client closed the request")))
		return
	}
	span.AddEvent("failed", trace.WithAttributes(attribute.String("error", err.Error())))
	span.SetStatus(codes.Error, err.Error())
}

// deadlineHeader lets a client shorten or lengthen its deadline up to
// Config.MaxDeadline: a Go duration ("1500ms") or whole seconds ("2").
const deadlineHeader = "X-Request-Timeout"

// deadlineOf is when the request must have finished.
func (g *Gateway) deadlineOf(h http.Header, start time.Time) (time.Time, error) {
	v := h.Get(deadlineHeader)
	if v == "" {
		return start.Add(time.Duration(g.cfg.QueueTimeout)), nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		n, nerr := strconv.Atoi(v)
		if nerr != nil {
			return time.Time{}, invalidf("", "%s: want a duration such as 1500ms or whole seconds, got %q", deadlineHeader, v)
		}
		d = time.Duration(n) * time.Second
	}
	if d <= 0 || d > time.Duration(g.cfg.MaxDeadline) {
		return time.Time{}, invalidf("", "%s: must be above 0 and at most %s, got %s", deadlineHeader, g.cfg.MaxDeadline, d)
	}
	return start.Add(d), nil
}

// deadlineCause reports the request's own deadline rather than the bare
// context error it surfaced as, so that it maps to 504, not 499.
func deadlineCause(ctx context.Context, err error) error {
	if errors.Is(err, context.DeadlineExceeded) && errors.Is(context.Cause(ctx), errDeadlinePassed) {
		return errDeadlinePassed
	}
	// Likewise a request ended by the shutdown is not a client that left.
	if errors.Is(err, context.Canceled) && errors.Is(context.Cause(ctx), errShuttingDown) {
		return errShuttingDown
	}
	return err
}

// checkModel refuses a model no worker serves. Until a worker is ready the
// catalog may be empty, and "not found" would mislead.
func (g *Gateway) checkModel(name string) error {
	for _, m := range g.catalog.Models() {
		if m.Name == name {
			return nil
		}
	}
	if !g.catalog.Ready() {
		return errNotReady
	}
	return &unknownModel{model: name}
}

// next waits for the stream's next event and turns a worker error, the
// client leaving or a stream that ends without a result into an error.
func (g *Gateway) next(ctx context.Context, run *inflight) (infer.Event, error) {
	return g.nextHolding(ctx, run, nil)
}

// nextHolding is next for a stream whose SSE writer sw may hold bytes: they
// go out when their window ends, while the next event is awaited. sw may be
// nil.
func (g *Gateway) nextHolding(ctx context.Context, run *inflight, sw *sseWriter) (infer.Event, error) {
	for {
		var due <-chan time.Time
		if sw != nil {
			due = sw.due()
		}
		select {
		case ev, ok := <-run.dispatch.Events():
			return g.event(ctx, run, ev, ok, sw)
		case <-due:
			if err := sw.Flush(); err != nil {
				return infer.Event{}, err
			}
		case <-ctx.Done():
			return infer.Event{}, ctx.Err()
		}
	}
}

// event checks one received event. For a token it records the timings and
// debits the tenant's output-token limit, pacing the stream when the
// tenant is over its rate.
func (g *Gateway) event(ctx context.Context, run *inflight, ev infer.Event, ok bool, sw *sseWriter) (infer.Event, error) {
	switch {
	case !ok:
		return ev, errNoResult
	case ev.Err != nil:
		g.metrics.streamErrors.WithLabelValues(errorCodeLabel(ev.Err.Code)).Inc()
		return ev, &workerFailure{err: *ev.Err, promptParam: run.req.kind.promptParam()}
	case ev.Done != nil:
		// The backend's own count wins where its events carried fewer
		// (an upstream that put several tokens in one chunk), so that a
		// tokens_per_minute reservation gives back only what was unused.
		run.tokens = max(run.tokens, int(ev.Done.CompletionTokens))
		return ev, nil
	}
	now := time.Now()
	if run.first.IsZero() {
		run.first = now
		g.metrics.ttft.WithLabelValues(run.labels[:]...).Observe(now.Sub(run.last).Seconds())
		run.interToken = g.metrics.interToken.WithLabelValues(run.labels[:]...)
	} else {
		run.interToken.Observe(now.Sub(run.last).Seconds())
	}
	run.last = now
	n := int(ev.Token.Count)
	run.tokens += n
	g.metrics.tokens.Add(float64(n))
	wait, err := run.adm.debitTokens(ctx, n)
	if err != nil {
		if lim, ok := errors.AsType[*rateLimited](err); ok {
			g.refused(ctx, lim)
			return ev, err
		}
		if ctx.Err() != nil {
			return ev, ctx.Err()
		}
		g.log.Warn("output tokens not debited", "request_id", run.dispatch.ID(), "err", err)
	}
	if err := pace(ctx, wait, sw); err != nil {
		return ev, err
	}
	return ev, nil
}

// pace waits out a tenant's output-token debt. Bytes the SSE writer sw
// holds still go out when their window ends; sw may be nil.
func pace(ctx context.Context, wait time.Duration, sw *sseWriter) error {
	if wait <= 0 {
		return nil
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		var due <-chan time.Time
		if sw != nil {
			due = sw.due()
		}
		select {
		case <-t.C:
			return nil
		case <-due:
			if err := sw.Flush(); err != nil {
				return err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// stream writes the answer as server-sent events. Over HTTP/3 the response
// stream gets the request's QUIC priority, and tokens are coalesced by the
// request's class (coalesce.go); the first token, the end and errors go at once.
func (g *Gateway) stream(ctx context.Context, w http.ResponseWriter, run *inflight, enc *encoder, ev infer.Event) {
	sw := g.newSSEWriter(ctx, w, run.prio, run.class, run.dispatch.ID())
	g.mergeTokens(ctx, sw, run.class, enc.token)
	if g.relay(ctx, sw, run, enc, ev) {
		sw.Close()
	} else {
		sw.Abort()
	}
	g.metrics.writes.WithLabelValues(urgencyLabel(run.prio.Urgency)).Observe(float64(sw.writes()))
}

// relay writes ev and the events after it to sw, and reports whether the
// stream may end cleanly: its last event, [DONE] or an error event, was
// written. Before that last event it gives back the tokens the request
// reserved and did not use, so that a client that has read the end of the
// stream finds them in its tenant's budget.
func (g *Gateway) relay(ctx context.Context, sw *sseWriter, run *inflight, enc *encoder, ev infer.Event) bool {
	if sw.Write(enc.opening()) != nil {
		return false
	}
	first := true
	// Logprobs of tokens whose text has not gone out yet (held back by
	// the detokenizer) ride with the next text, or with the end; offset
	// is where the next token's text starts, for text completions.
	var pending []infer.TokenLogprob
	offset := 0
	for ev.Done == nil {
		pending = append(pending, ev.Token.Logprobs...)
		if ev.Token.Text != "" {
			var err error
			if pending != nil {
				var event []byte
				event, offset = enc.tokenWithLogprobs(ev.Token.Text, pending, offset)
				pending = nil
				err = sw.Write(event)
			} else {
				err = sw.WriteText(ev.Token.Text, run.last)
			}
			if err != nil {
				return false
			}
			if first {
				if sw.Flush() != nil {
					return false
				}
				first = false
			}
		}
		for _, event := range enc.toolCallEvents(ev.Token.ToolCalls) {
			if sw.Write(event) != nil {
				return false
			}
			if first {
				if sw.Flush() != nil {
					return false
				}
				first = false
			}
		}
		var err error
		if ev, err = g.nextHolding(ctx, run, sw); err != nil {
			run.adm.settle(ctx, run.tokens)
			return g.streamFailed(ctx, sw, run, err)
		}
	}
	run.adm.settle(ctx, run.tokens)
	// [DONE] is written even if an event before it failed, and decides
	// how the stream ends.
	if sw.Write(enc.finish(finishReason(ev.Done), pending, offset)) == nil && run.req.includeUsage {
		sw.Write(enc.usage(usageOf(ev.Done)))
	}
	return sw.Write(sseDone) == nil
}

// streamFailed marks on the span why the events stopped and, unless the
// client left, logs it and writes the error event that ends the stream,
// reporting whether that write succeeded.
func (g *Gateway) streamFailed(ctx context.Context, sw *sseWriter, run *inflight, err error) bool {
	err = deadlineCause(ctx, err)
	failed(ctx, err)
	if errors.Is(err, context.Canceled) {
		return false
	}
	g.log.Warn("stream failed", "request_id", run.dispatch.ID(), "err", err)
	return sw.Write(errorEvent(err)) == nil
}

// collect gathers the whole answer and writes it as one JSON object.
func (g *Gateway) collect(ctx context.Context, w http.ResponseWriter, run *inflight, enc *encoder, ev infer.Event) {
	var text strings.Builder
	var lps []infer.TokenLogprob
	var calls toolCalls
	for ev.Done == nil {
		text.WriteString(ev.Token.Text)
		lps = append(lps, ev.Token.Logprobs...)
		calls.add(ev.Token.ToolCalls)
		var err error
		if ev, err = g.next(ctx, run); err != nil {
			err = deadlineCause(ctx, err)
			failed(ctx, err)
			writeError(w, err)
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	if run.req.job.Logprobs && lps == nil {
		lps = []infer.TokenLogprob{} // asked for, and no token made: an empty list, not null
	}
	if len(calls.calls) > 0 {
		w.Write(enc.completeWithCalls(text.String(), finishReason(ev.Done), usageOf(ev.Done), lps, calls.whole()))
		return
	}
	w.Write(enc.complete(text.String(), finishReason(ev.Done), usageOf(ev.Done), lps))
}

func finishReason(d *infer.Done) string {
	if d.FinishReason == "" {
		return infer.FinishStop
	}
	return d.FinishReason
}
