package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

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
	mux.Handle("GET /metrics", promhttp.HandlerFor(g.cfg.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /workers", func(w http.ResponseWriter, r *http.Request) {
		states := g.catalog.WorkerStates()
		if states == nil {
			states = []WorkerState{}
		}
		writeJSON(w, struct {
			Workers []WorkerState `json:"workers"`
		}{states})
	})
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

	ctx := r.Context()
	st, err := g.sched.Submit(ctx, &scheduler.Request{
		Urgency:  urgencyOf(r.Header),
		Deadline: start.Add(g.cfg.QueueTimeout),
		Job:      req.job,
	})
	if err != nil {
		writeError(w, err)
		return
	}
	// Closing cancels the worker's sequence if the client left early.
	defer st.Close()

	ev, err := g.next(ctx, st, req)
	if err != nil {
		if ctx.Err() == nil {
			g.log.Debug("request failed before its first token", "request_id", st.ID(), "err", err)
		}
		writeError(w, err)
		return
	}
	g.metrics.ttft.WithLabelValues(req.model).Observe(time.Since(start).Seconds())
	enc := newEncoder(kind, req.model, start.Unix())
	if req.stream {
		g.stream(ctx, w, st, req, enc, ev)
		return
	}
	g.collect(ctx, w, st, req, enc, ev)
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
		switch {
		case !ok:
			return ev, errNoResult
		case ev.Err != nil:
			g.metrics.streamErrors.WithLabelValues(errorCodeLabel(ev.Err.Code)).Inc()
			return ev, &workerFailure{err: *ev.Err, promptParam: req.kind.promptParam()}
		case ev.Done == nil:
			g.metrics.tokens.Add(float64(ev.Token.Count))
		}
		return ev, nil
	case <-ctx.Done():
		return transport.Event{}, ctx.Err()
	}
}

// stream writes the answer as server-sent events, flushing every token.
func (g *Gateway) stream(ctx context.Context, w http.ResponseWriter, st TokenStream, req *completion, enc *encoder, ev transport.Event) {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	send := func(b []byte) bool {
		if len(b) == 0 {
			return true
		}
		if _, err := w.Write(b); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	if !send(enc.opening()) {
		return
	}
	for {
		if done := ev.Done; done != nil {
			if send(enc.finish(finishReason(done))) && req.includeUsage {
				send(enc.usage(usageOf(done)))
			}
			send(sseDone)
			return
		}
		if ev.Token.Text != "" && !send(enc.token(ev.Token.Text)) {
			return
		}
		var err error
		if ev, err = g.next(ctx, st, req); err != nil {
			if ctx.Err() == nil {
				g.log.Warn("stream failed", "request_id", st.ID(), "err", err)
				send(errorEvent(err))
			}
			return
		}
	}
}

// collect gathers the whole answer and writes it as one JSON object.
func (g *Gateway) collect(ctx context.Context, w http.ResponseWriter, st TokenStream, req *completion, enc *encoder, ev transport.Event) {
	var text strings.Builder
	for ev.Done == nil {
		text.WriteString(ev.Token.Text)
		var err error
		if ev, err = g.next(ctx, st, req); err != nil {
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
