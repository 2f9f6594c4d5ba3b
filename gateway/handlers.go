package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"h3infer/scheduler"
	"h3infer/transport"
)

// routes is the API and the chat page, served identically over HTTP/3 and
// TCP.
func (g *Gateway) routes() (http.Handler, error) {
	mux := http.NewServeMux()
	if err := routePage(mux); err != nil {
		return nil, err
	}
	mux.HandleFunc("/v1/chat/completions", g.guard("/v1/chat/completions", func(w http.ResponseWriter, r *http.Request) {
		g.serveCompletion(w, r, kindChat)
	}))
	mux.HandleFunc("/v1/completions", g.guard("/v1/completions", func(w http.ResponseWriter, r *http.Request) {
		g.serveCompletion(w, r, kindText)
	}))
	mux.HandleFunc("/v1/models", g.guard("/v1/models", g.serveModels))
	mux.HandleFunc("/v1/models/{model...}", g.guard("/v1/models/", g.serveModel))
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
	mux.Handle("GET /metrics", promhttp.HandlerFor(g.cfg.Registry, promhttp.HandlerOpts{}))
	return mux
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

	prio := parsePriority(r.Header)
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
	sreq := &scheduler.Request{
		Tenant:         g.cfg.Tenant(r),
		Urgency:        prio.urgency,
		DefaultUrgency: !prio.hasUrgency,
		Deadline:       deadline,
		Job:            req.job,
	}
	// The token limits the models and caps the urgency (auth.go).
	if err := identify(ctx, req.model, sreq); err != nil {
		writeError(w, err)
		return
	}
	st, err := g.sched.Submit(ctx, sreq)
	if err != nil {
		writeError(w, deadlineCause(ctx, err))
		return
	}
	// Closing cancels the worker's sequence if the client left early.
	defer st.Close()
	// The tenant's default and ceiling may have changed what was asked.
	prio.urgency = sreq.Urgency

	ev, err := g.next(ctx, st, req)
	if err != nil {
		if ctx.Err() == nil {
			g.log.Debug("request failed before its first token", "request_id", st.ID(), "err", err)
		}
		writeError(w, deadlineCause(ctx, err))
		return
	}
	g.metrics.ttft.WithLabelValues(req.model).Observe(time.Since(start).Seconds())
	enc := newEncoder(kind, req.model, start.Unix())
	if req.stream {
		g.stream(ctx, w, st, req, enc, ev, prio)
		return
	}
	g.collect(ctx, w, st, req, enc, ev)
}

// deadlineHeader lets a client shorten or lengthen its deadline up to
// Config.MaxDeadline: a Go duration ("1500ms") or whole seconds ("2").
const deadlineHeader = "X-Request-Timeout"

// deadlineOf is when the request must have finished.
func (g *Gateway) deadlineOf(h http.Header, start time.Time) (time.Time, error) {
	v := h.Get(deadlineHeader)
	if v == "" {
		return start.Add(g.cfg.QueueTimeout), nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		n, nerr := strconv.Atoi(v)
		if nerr != nil {
			return time.Time{}, invalidf("", "%s: want a duration such as 1500ms or whole seconds, got %q", deadlineHeader, v)
		}
		d = time.Duration(n) * time.Second
	}
	if d <= 0 || d > g.cfg.MaxDeadline {
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
func (g *Gateway) next(ctx context.Context, st TokenStream, req *completion) (transport.Event, error) {
	select {
	case ev, ok := <-st.Events():
		return g.event(ev, ok, req)
	case <-ctx.Done():
		return transport.Event{}, ctx.Err()
	}
}

// event checks one received event.
func (g *Gateway) event(ev transport.Event, ok bool, req *completion) (transport.Event, error) {
	switch {
	case !ok:
		return ev, errNoResult
	case ev.Err != nil:
		return ev, &workerFailure{err: *ev.Err, promptParam: req.kind.promptParam()}
	case ev.Done == nil:
		g.metrics.tokens.Add(float64(ev.Token.Count))
	}
	return ev, nil
}

// stream writes the answer as server-sent events. Over HTTP/3 the response
// stream gets the request's QUIC priority, and tokens are coalesced by
// urgency (coalesce.go); the first token, the end and errors go at once.
func (g *Gateway) stream(ctx context.Context, w http.ResponseWriter, st TokenStream, req *completion, enc *encoder, ev transport.Event, prio priority) {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	out, finish, err := sseOutput(w, prio)
	if err != nil {
		g.log.Warn("stream: take over the HTTP/3 stream", "request_id", st.ID(), "err", err)
		return
	}
	c := newCoalescer(g.cfg.Coalesce.window(prio.urgency), g.cfg.Coalesce.MaxBuffer, out)
	defer func() {
		c.stop()
		g.metrics.writes.WithLabelValues(strconv.Itoa(int(prio.urgency))).Observe(float64(c.writes))
	}()
	clean := false
	defer func() { finish(clean) }()

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
			if send(enc.finish(finishReason(done)), false) && req.includeUsage {
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
		if ev, err = g.nextHolding(ctx, st, req, c); err != nil {
			err = deadlineCause(ctx, err)
			if !errors.Is(err, context.Canceled) {
				g.log.Warn("stream failed", "request_id", st.ID(), "err", err)
				clean = send(errorEvent(err), true)
			}
			return
		}
	}
}

// nextHolding is next for a stream whose coalescer may hold bytes: they go
// out when their window ends, while the next event is awaited.
func (g *Gateway) nextHolding(ctx context.Context, st TokenStream, req *completion, c *coalescer) (transport.Event, error) {
	for {
		select {
		case ev, ok := <-st.Events():
			return g.event(ev, ok, req)
		case <-c.C():
			if err := c.flush(); err != nil {
				return transport.Event{}, err
			}
		case <-ctx.Done():
			return transport.Event{}, ctx.Err()
		}
	}
}

// sseOutput returns how the stream writes one flushed chunk and how it
// ends. Over HTTP/3 it takes the stream over from http3's response writer
// (after the header went out) to set the stream's QUIC priority, which the
// ResponseWriter API has no way to do; quic-go keeps applying the client's
// PRIORITY_UPDATE frames to the stream afterwards. Each Write there is one
// DATA frame. Over TCP each chunk is written and flushed.
func sseOutput(w http.ResponseWriter, prio priority) (out func([]byte) error, finish func(clean bool), err error) {
	for rw := w; rw != nil; {
		if hs, ok := rw.(http3.HTTPStreamer); ok {
			str, err := hs.HTTPStream()
			if err != nil {
				return nil, nil, err
			}
			str.SetPriority(int8(prio.urgency), prio.incremental)
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
func (g *Gateway) collect(ctx context.Context, w http.ResponseWriter, st TokenStream, req *completion, enc *encoder, ev transport.Event) {
	var text strings.Builder
	for ev.Done == nil {
		text.WriteString(ev.Token.Text)
		var err error
		if ev, err = g.next(ctx, st, req); err != nil {
			writeError(w, deadlineCause(ctx, err))
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
