package gateway

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"h3infer/infer"
	"h3infer/priority"
	"h3infer/scheduler"
)

// apiRoute is one token-guarded route: path names it in
// AuthConfig.EarlyData (zero_rtt.routes), pattern is what the mux matches.
type apiRoute struct {
	path, pattern string
	serve         func(*Gateway, http.ResponseWriter, *http.Request)
}

// apiRouteTable is the token-guarded API. routes serves it and
// EarlyDataRoutes names it, so the two cannot drift apart.
func apiRouteTable() []apiRoute {
	return []apiRoute{
		{"/v1/chat/completions", "/v1/chat/completions", func(g *Gateway, w http.ResponseWriter, r *http.Request) {
			g.serveCompletion(w, r, kindChat)
		}},
		{"/v1/completions", "/v1/completions", func(g *Gateway, w http.ResponseWriter, r *http.Request) {
			g.serveCompletion(w, r, kindText)
		}},
		{"/v1/models", "/v1/models", (*Gateway).serveModels},
		{"/v1/models/", "/v1/models/{model...}", (*Gateway).serveModel},
	}
}

// EarlyDataRoutes lists the route paths AuthConfig.EarlyData may name,
// in the order the API serves them.
func EarlyDataRoutes() []string {
	var paths []string
	for _, rt := range apiRouteTable() {
		paths = append(paths, rt.path)
	}
	return paths
}

// routes is the API and the chat page, served identically over HTTP/3 and
// TCP.
func (g *Gateway) routes() (http.Handler, error) {
	mux := http.NewServeMux()
	if err := routePage(mux); err != nil {
		return nil, err
	}
	for _, rt := range apiRouteTable() {
		mux.HandleFunc(rt.pattern, g.guard(rt.path, func(w http.ResponseWriter, r *http.Request) {
			rt.serve(g, w, r)
		}))
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errRouteNotFound)
	})
	return mux, nil
}

func (g *Gateway) adminRoutes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !g.catalog.Ready() {
			http.Error(w, "no model worker is ready", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	})
	mux.Handle("GET /metrics", g.adminAuth(promhttp.HandlerFor(g.cfg.Registry, promhttp.HandlerOpts{})))
	mux.Handle("GET /debug/state", g.adminAuth(http.HandlerFunc(g.serveState)))
	mux.Handle("/debug/pprof/", g.adminAuth(http.HandlerFunc(pprof.Index)))
	mux.Handle("/debug/pprof/cmdline", g.adminAuth(http.HandlerFunc(pprof.Cmdline)))
	mux.Handle("/debug/pprof/profile", g.adminAuth(http.HandlerFunc(pprof.Profile)))
	mux.Handle("/debug/pprof/symbol", g.adminAuth(http.HandlerFunc(pprof.Symbol)))
	mux.Handle("/debug/pprof/trace", g.adminAuth(http.HandlerFunc(pprof.Trace)))
	if g.cfg.ModelAdmin != nil {
		g.modelAdminRoutes(mux)
	}
	guard := newAdminGuard(g.cfg.Admin, g.admin, g.cfg.AdminHosts, func(reason string) {
		g.metrics.adminRefusals.WithLabelValues(reason).Inc()
	})
	return guard.wrap(mux)
}

// adminAuth demands the admin token when one is configured. Health and
// readiness stay open so that load balancers need no secret.
func (g *Gateway) adminAuth(next http.Handler) http.Handler {
	if g.cfg.AdminToken == "" {
		return next
	}
	want := []byte("Bearer " + g.cfg.AdminToken)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) != 1 {
			g.metrics.adminRefusals.WithLabelValues("token").Inc()
			writeError(w, errAdminToken)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// serveState is the operator's JSON view: models, readiness, each worker
// process's supervision state, and whatever Config.Status reports about
// queues.
func (g *Gateway) serveState(w http.ResponseWriter, r *http.Request) {
	state := struct {
		Ready   bool              `json:"ready"`
		Models  []infer.ModelInfo `json:"models"`
		Workers []WorkerState     `json:"workers"`
		Status  any               `json:"status,omitempty"`
	}{Ready: g.catalog.Ready(), Models: g.catalog.Models(), Workers: g.catalog.WorkerStates()}
	if state.Workers == nil {
		state.Workers = []WorkerState{}
	}
	if g.cfg.Status != nil {
		state.Status = g.cfg.Status()
	}
	writeJSON(w, state)
}

// serveCompletion runs one chat or text completion. It commits the response
// status only after the worker's first event, so that a request the worker
// refuses (too long for the context, say) still gets a proper status.
func (g *Gateway) serveCompletion(w http.ResponseWriter, r *http.Request, kind apiKind) {
	start := time.Now()
	if r.Method != http.MethodPost {
		writeError(w, &methodNotAllowed{method: r.Method, allow: http.MethodPost})
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, g.cfg.MaxBodyBytes))
	if err != nil {
		if _, tooLarge := errors.AsType[*http.MaxBytesError](err); !tooLarge && r.Context().Err() == nil {
			err = invalidf("", "reading the request body: %v", err)
		}
		writeError(w, err)
		return
	}
	req, err := parseCompletion(body, kind, g.cfg.DefaultMaxTokens)
	if err == nil {
		err = g.checkModel(req.model)
	}
	var ceiling priority.Urgency
	if err == nil {
		// The token limits the models and caps the urgency (auth.go).
		ceiling, err = identify(r.Context(), req.model)
	}
	if err != nil {
		writeError(w, err)
		return
	}

	prio := priority.Parse(r.Header.Values("Priority"))
	deadline, err := g.deadlineOf(r.Header, start)
	if err != nil {
		writeError(w, err)
		return
	}
	ctx, cancel := context.WithDeadlineCause(r.Context(), deadline, errDeadlinePassed)
	defer cancel()
	// At the end of a shutdown's grace the request ends with an error
	// saying so, rather than being cut off with its connection.
	ctx, cancelAbort := context.WithCancelCause(ctx)
	defer cancelAbort(nil)
	stopAbort := context.AfterFunc(g.aborting, func() { cancelAbort(context.Cause(g.aborting)) })
	defer stopAbort()

	run := &inflight{req: req, labels: [2]string{req.model, urgencyLabel(prio.Urgency)}, last: start}
	defer func() {
		g.metrics.duration.WithLabelValues(run.labels[:]...).Observe(sinceSeconds(start))
		span := trace.SpanFromContext(ctx)
		if span.IsRecording() {
			span.SetAttributes(attribute.Int("h3infer.completion_tokens", run.tokens))
			if !run.first.IsZero() {
				span.SetAttributes(attribute.Float64("h3infer.time_to_first_token_s", run.first.Sub(start).Seconds()))
			}
		}
	}()

	tenant := g.cfg.Tenant(r)
	adm, err := g.limits.Load().admit(ctx, tenant, w.Header())
	if err != nil {
		if lim, ok := errors.AsType[*rateLimited](err); ok {
			g.refused(ctx, lim)
			writeError(w, err)
			return
		}
		g.log.Warn("rate limit not checked; admitting", "tenant", tenant, "err", err)
	}
	defer adm.release()
	run.adm = adm

	job := req.job
	job.TraceParent = traceParent(ctx)
	// versionFailed says whether the routed version failed the request
	// before its first token, for the per-version metrics.
	versionFailed := true
	if g.cfg.Router != nil {
		key := req.user
		if key == "" {
			key = tenant
		}
		target, ver, done, err := g.cfg.Router.Route(req.model, key, r.Header.Get(VersionHeader))
		if err != nil {
			writeError(w, err)
			return
		}
		defer func() { done(versionFailed) }()
		job.Model = target
		w.Header().Set(VersionHeader, ver)
	}
	qctx, qspan := g.tracer.Start(ctx, "admission")
	sreq := &scheduler.Request{
		Tenant:         tenant,
		Urgency:        prio.Urgency,
		DefaultUrgency: !prio.HasUrgency,
		UrgencyCeiling: ceiling,
		Deadline:       deadline,
		Job:            job,
	}
	st, decided, err := g.sched.Submit(qctx, sreq)
	// The tenant's default and ceiling may have changed what was asked;
	// the stream's priority and the metrics follow what was applied.
	prio.Urgency = decided.Urgency
	run.labels[1] = urgencyLabel(prio.Urgency)
	g.metrics.queueWait.WithLabelValues(run.labels[:]...).Observe(sinceSeconds(start))
	if err != nil {
		err = deadlineCause(ctx, err)
		qspan.RecordError(err)
		qspan.SetStatus(codes.Error, "not admitted")
		qspan.End()
		writeError(w, err)
		return
	}
	qspan.End()
	if span := trace.SpanFromContext(ctx); span.IsRecording() {
		attrs := []attribute.KeyValue{
			attribute.Int64("h3infer.request_id", int64(st.ID())),
			attribute.String("h3infer.tenant", tenant),
			attribute.Int("h3infer.urgency", int(prio.Urgency)),
		}
		if wk, ok := st.(interface{ BackendID() int }); ok {
			attrs = append(attrs, attribute.Int("h3infer.worker", wk.BackendID()))
		}
		span.AddEvent("dispatched", trace.WithAttributes(attrs...))
	}
	// Closing cancels the worker's sequence if the client left early.
	defer st.Close()
	run.st = st

	ev, err := g.next(ctx, run)
	if err != nil {
		err = deadlineCause(ctx, err)
		if !errors.Is(err, context.Canceled) {
			g.log.Debug("request failed before its first token", "request_id", st.ID(), "err", err)
		}
		failed(ctx, err)
		writeError(w, err)
		return
	}
	// The first token arrived: the version served the request.
	versionFailed = false
	enc := newEncoder(kind, req.model, start.Unix())
	if req.stream {
		g.stream(ctx, w, run, enc, ev, prio, decided.Class)
		return
	}
	g.collect(ctx, w, run, enc, ev)
}

// urgencyLabel is the metric label of an urgency, 0..7.
func urgencyLabel(u priority.Urgency) string { return strconv.Itoa(int(u)) }

// inflight is one completion request's state while it streams.
type inflight struct {
	req         *completion
	st          Dispatch
	adm         *admission
	labels      [2]string // model, urgency
	first, last time.Time // arrival of the first and latest token events
	tokens      int
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

// nextHolding is next for a stream whose coalescer c may hold bytes: they go
// out when their window ends, while the next event is awaited. c may be nil.
func (g *Gateway) nextHolding(ctx context.Context, run *inflight, c *coalescer) (infer.Event, error) {
	for {
		var due <-chan time.Time
		if c != nil {
			due = c.C()
		}
		select {
		case ev, ok := <-run.st.Events():
			return g.event(ctx, run, ev, ok, c)
		case <-due:
			if err := c.flush(); err != nil {
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
func (g *Gateway) event(ctx context.Context, run *inflight, ev infer.Event, ok bool, c *coalescer) (infer.Event, error) {
	switch {
	case !ok:
		return ev, errNoResult
	case ev.Err != nil:
		g.metrics.streamErrors.WithLabelValues(errorCodeLabel(ev.Err.Code)).Inc()
		return ev, &workerFailure{err: *ev.Err, promptParam: run.req.kind.promptParam()}
	case ev.Done != nil:
		return ev, nil
	}
	now := time.Now()
	if run.first.IsZero() {
		run.first = now
		g.metrics.ttft.WithLabelValues(run.labels[:]...).Observe(now.Sub(run.last).Seconds())
	} else {
		g.metrics.interToken.WithLabelValues(run.labels[:]...).Observe(now.Sub(run.last).Seconds())
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
		g.log.Warn("output tokens not debited", "request_id", run.st.ID(), "err", err)
	}
	if err := pace(ctx, wait, c); err != nil {
		return ev, err
	}
	return ev, nil
}

// pace waits out a tenant's output-token debt. Bytes the coalescer c holds
// still go out when their window ends; c may be nil.
func pace(ctx context.Context, wait time.Duration, c *coalescer) error {
	if wait <= 0 {
		return nil
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		var due <-chan time.Time
		if c != nil {
			due = c.C()
		}
		select {
		case <-t.C:
			return nil
		case <-due:
			if err := c.flush(); err != nil {
				return err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// stream writes the answer as server-sent events. Over HTTP/3 the response
// stream gets the request's QUIC priority, and tokens are coalesced by
// urgency (coalesce.go); the first token, the end and errors go at once.
func (g *Gateway) stream(ctx context.Context, w http.ResponseWriter, run *inflight, enc *encoder, ev infer.Event, prio priority.Signal, class priority.Class) {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	// The response header goes out with the first bytes of the body, not
	// ahead of them: taking over the HTTP/3 stream flushes the header, and
	// done apart from the first write it went in a packet of its own,
	// which the client had to take before the first token.
	var (
		write  func([]byte) error
		finish = func(bool) {}
	)
	open := func() error {
		var err error
		if write, finish, err = sseOutput(w, prio); err != nil {
			finish = func(bool) {}
			g.log.Warn("stream: take over the HTTP/3 stream", "request_id", run.st.ID(), "err", err)
		}
		return err
	}
	cut := false
	out := func(b []byte) error {
		if write == nil {
			if err := open(); err != nil {
				cut = true
				return err
			}
		}
		err := write(b)
		if err != nil && !cut {
			// The client went away or stopped reading; the deferred
			// Close cancels the worker's sequence.
			cut = true
			trace.SpanFromContext(ctx).AddEvent("cancelled",
				trace.WithAttributes(attribute.String("reason", "writing to the client failed: "+err.Error())))
		}
		return err
	}
	c := newCoalescer(g.cfg.Coalesce.window(class), g.cfg.Coalesce.MaxBuffer, out)
	defer func() {
		c.stop()
		g.metrics.writes.WithLabelValues(urgencyLabel(prio.Urgency)).Observe(float64(c.writes))
	}()
	clean := false
	defer func() { finish(clean) }() // finish as it is when the stream ends

	send := func(b []byte, now bool) bool {
		if len(b) == 0 {
			return !now || c.flush() == nil
		}
		return c.add(b, now) == nil
	}
	if !send(enc.opening(), false) {
		return
	}
	first := true
	for {
		if done := ev.Done; done != nil {
			if send(enc.finish(finishReason(done)), false) && run.req.includeUsage {
				send(enc.usage(usageOf(done)), false)
			}
			clean = send(sseDone, true)
			return
		}
		if ev.Token.Text != "" {
			if !send(enc.token(ev.Token.Text), first) {
				return
			}
			first = false
		}
		var err error
		if ev, err = g.nextHolding(ctx, run, c); err != nil {
			err = deadlineCause(ctx, err)
			failed(ctx, err)
			if !errors.Is(err, context.Canceled) {
				g.log.Warn("stream failed", "request_id", run.st.ID(), "err", err)
				clean = send(errorEvent(err), true)
			}
			return
		}
	}
}

// sseOutput returns how the stream writes one flushed chunk and how it
// ends. Over HTTP/3 it takes the stream over from http3's response writer
// (after the header went out) to set the stream's QUIC priority, which the
// ResponseWriter API has no way to do; quic-go keeps applying the client's
// PRIORITY_UPDATE frames to the stream afterwards. Each Write there is one
// DATA frame. Over TCP each chunk is written and flushed.
func sseOutput(w http.ResponseWriter, prio priority.Signal) (out func([]byte) error, finish func(clean bool), err error) {
	for rw := w; rw != nil; {
		if hs, ok := rw.(http3.HTTPStreamer); ok {
			str, err := hs.HTTPStream()
			if err != nil {
				return nil, nil, err
			}
			str.SetPriority(int8(prio.Urgency), streamIncremental(prio))
			out = func(b []byte) error {
				_, err := str.Write(b)
				return err
			}
			finish = func(clean bool) {
				if clean {
					str.Close()
					return
				}
				str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
			}
			return out, finish, nil
		}
		u, ok := rw.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			break
		}
		rw = u.Unwrap()
	}
	rc := http.NewResponseController(w)
	out = func(b []byte) error {
		if _, err := w.Write(b); err != nil {
			return err
		}
		return rc.Flush()
	}
	return out, func(bool) {}, nil
}

// collect gathers the whole answer and writes it as one JSON object.
func (g *Gateway) collect(ctx context.Context, w http.ResponseWriter, run *inflight, enc *encoder, ev infer.Event) {
	var text strings.Builder
	for ev.Done == nil {
		text.WriteString(ev.Token.Text)
		var err error
		if ev, err = g.next(ctx, run); err != nil {
			err = deadlineCause(ctx, err)
			failed(ctx, err)
			writeError(w, err)
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(enc.complete(text.String(), finishReason(ev.Done), usageOf(ev.Done)))
}

func finishReason(d *infer.Done) string {
	if d.FinishReason == "" {
		return infer.FinishStop
	}
	return d.FinishReason
}

type modelObject struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

func (g *Gateway) modelObject(m infer.ModelInfo) modelObject {
	return modelObject{ID: m.Name, Object: "model", Created: g.created, OwnedBy: "h3infer"}
}

func (g *Gateway) serveModels(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeError(w, &methodNotAllowed{method: r.Method, allow: "GET, HEAD"})
		return
	}
	list := struct {
		Object string        `json:"object"`
		Data   []modelObject `json:"data"`
	}{Object: "list", Data: []modelObject{}}
	for _, m := range g.catalog.Models() {
		list.Data = append(list.Data, g.modelObject(m))
	}
	writeJSON(w, list)
}

func (g *Gateway) serveModel(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeError(w, &methodNotAllowed{method: r.Method, allow: "GET, HEAD"})
		return
	}
	name := r.PathValue("model")
	for _, m := range g.catalog.Models() {
		if m.Name == name {
			writeJSON(w, g.modelObject(m))
			return
		}
	}
	writeError(w, &unknownModel{model: name})
}

func writeJSON(w http.ResponseWriter, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, fmt.Errorf("encode response: %w", err))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(append(b, '\n'))
}
