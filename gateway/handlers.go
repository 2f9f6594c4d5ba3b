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
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"h3infer/scheduler"
	"h3infer/transport"
)

// routes is the API, served identically over HTTP/3 and TCP.
func (g *Gateway) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/chat/completions", func(w http.ResponseWriter, r *http.Request) {
		g.serveCompletion(w, r, kindChat)
	})
	mux.HandleFunc("/v1/completions", func(w http.ResponseWriter, r *http.Request) {
		g.serveCompletion(w, r, kindText)
	})
	mux.HandleFunc("/v1/models", g.serveModels)
	mux.HandleFunc("/v1/models/{model...}", g.serveModel)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errRouteNotFound)
	})
	return mux
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
	return mux
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
			w.Header().Set("WWW-Authenticate", `Bearer realm="h3infer-admin"`)
			http.Error(w, "admin token required", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// serveState is the operator's JSON view: models, readiness, and whatever
// Config.Status reports about workers and queues.
func (g *Gateway) serveState(w http.ResponseWriter, r *http.Request) {
	state := struct {
		Ready  bool                  `json:"ready"`
		Models []transport.ModelInfo `json:"models"`
		Status any                   `json:"status,omitempty"`
	}{Ready: g.catalog.Ready(), Models: g.catalog.Models()}
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
	if err != nil {
		writeError(w, err)
		return
	}

	ctx := r.Context()
	urgency := urgencyOf(r.Header)
	run := &inflight{req: req, labels: [2]string{req.model, strconv.Itoa(int(urgency))}, last: start}
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

	tenant := g.cfg.TenantOf(r)
	adm, err := g.limits.admit(ctx, tenant, w.Header())
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
	qctx, qspan := g.tracer.Start(ctx, "admission")
	depth := g.metrics.queueDepth.WithLabelValues(run.labels[1])
	depth.Inc()
	st, err := g.sched.Submit(qctx, &scheduler.Request{
		Tenant:   tenant,
		Urgency:  urgency,
		Deadline: start.Add(g.cfg.QueueTimeout),
		Job:      job,
	})
	depth.Dec()
	g.metrics.queueWait.WithLabelValues(run.labels[:]...).Observe(sinceSeconds(start))
	if err != nil {
		qspan.RecordError(err)
		qspan.SetStatus(codes.Error, "not admitted")
		qspan.End()
		writeError(w, err)
		return
	}
	qspan.End()
	if span := trace.SpanFromContext(ctx); span.IsRecording() {
		attrs := []attribute.KeyValue{attribute.Int64("h3infer.request_id", int64(st.ID()))}
		if wk, ok := st.(interface{ WorkerID() int }); ok {
			attrs = append(attrs, attribute.Int("h3infer.worker", wk.WorkerID()))
		}
		span.AddEvent("dispatched", trace.WithAttributes(attrs...))
	}
	// Closing cancels the worker's sequence if the client left early.
	defer st.Close()
	run.st = st

	ev, err := g.next(ctx, run)
	if err != nil {
		if ctx.Err() == nil {
			g.log.Debug("request failed before its first token", "request_id", st.ID(), "err", err)
		}
		failed(ctx, err)
		writeError(w, err)
		return
	}
	enc := newEncoder(kind, req.model, start.Unix())
	if req.stream {
		g.stream(ctx, w, run, enc, ev)
		return
	}
	g.collect(ctx, w, run, enc, ev)
}

// inflight is one completion request's state while it streams.
type inflight struct {
	req         *completion
	st          TokenStream
	adm         *admission
	labels      [2]string // model, urgency
	first, last time.Time // arrival of the first and latest token events
	tokens      int
}

// refused counts a rate-limit refusal and marks the trace.
func (g *Gateway) refused(ctx context.Context, lim *rateLimited) {
	g.metrics.refusals.WithLabelValues(g.limits.tenantLabel(lim.tenant), lim.limit).Inc()
	trace.SpanFromContext(ctx).AddEvent("rate_limited", trace.WithAttributes(attribute.String("h3infer.limit", lim.limit)))
}

// failed marks the request's span with why it ended early.
func failed(ctx context.Context, err error) {
	span := trace.SpanFromContext(ctx)
	if !span.IsRecording() {
		return
	}
	if ctx.Err() != nil {
		span.AddEvent("cancelled", trace.WithAttributes(attribute.String("reason", "client closed the request")))
		return
	}
	span.AddEvent("failed", trace.WithAttributes(attribute.String("error", err.Error())))
	span.SetStatus(codes.Error, err.Error())
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
// client leaving or a stream that ends without a result into an error. It
// records token timings and debits the tenant's output-token limit.
func (g *Gateway) next(ctx context.Context, run *inflight) (transport.Event, error) {
	select {
	case ev, ok := <-run.st.Events():
		switch {
		case !ok:
			return ev, errNoResult
		case ev.Err != nil:
			return ev, &workerFailure{err: *ev.Err, promptParam: run.req.kind.promptParam()}
		case ev.Done == nil:
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
			if err := run.adm.debitTokens(ctx, n); err != nil {
				if lim, ok := errors.AsType[*rateLimited](err); ok {
					g.refused(ctx, lim)
					return ev, err
				}
				if ctx.Err() != nil {
					return ev, ctx.Err()
				}
				g.log.Warn("output tokens not debited", "request_id", run.st.ID(), "err", err)
			}
		}
		return ev, nil
	case <-ctx.Done():
		return transport.Event{}, ctx.Err()
	}
}

// stream writes the answer as server-sent events, flushing every token.
func (g *Gateway) stream(ctx context.Context, w http.ResponseWriter, run *inflight, enc *encoder, ev transport.Event) {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	send := func(b []byte) bool {
		if len(b) == 0 {
			return true
		}
		_, err := w.Write(b)
		if err == nil {
			err = rc.Flush()
		}
		if err != nil {
			// The client went away or stopped reading; the deferred
			// Close cancels the worker's sequence.
			trace.SpanFromContext(ctx).AddEvent("cancelled",
				trace.WithAttributes(attribute.String("reason", "writing to the client failed: "+err.Error())))
			return false
		}
		return true
	}
	if !send(enc.opening()) {
		return
	}
	for {
		if done := ev.Done; done != nil {
			if send(enc.finish(finishReason(done))) && run.req.includeUsage {
				send(enc.usage(usageOf(done)))
			}
			send(sseDone)
			return
		}
		if ev.Token.Text != "" && !send(enc.token(ev.Token.Text)) {
			return
		}
		var err error
		if ev, err = g.next(ctx, run); err != nil {
			failed(ctx, err)
			if ctx.Err() == nil {
				g.log.Warn("stream failed", "request_id", run.st.ID(), "err", err)
				send(errorEvent(err))
			}
			return
		}
	}
}

// collect gathers the whole answer and writes it as one JSON object.
func (g *Gateway) collect(ctx context.Context, w http.ResponseWriter, run *inflight, enc *encoder, ev transport.Event) {
	var text strings.Builder
	for ev.Done == nil {
		text.WriteString(ev.Token.Text)
		var err error
		if ev, err = g.next(ctx, run); err != nil {
			failed(ctx, err)
			writeError(w, err)
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(enc.complete(text.String(), finishReason(ev.Done), usageOf(ev.Done)))
}

func finishReason(d *transport.Done) string {
	if d.FinishReason == "" {
		return transport.FinishStop
	}
	return d.FinishReason
}

type modelObject struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

func (g *Gateway) modelObject(m transport.ModelInfo) modelObject {
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
