package gateway

import (
	"fmt"
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"h3infer/transport"
)

type metrics struct {
	requests *prometheus.CounterVec
	inFlight prometheus.Gauge
	ttft     *prometheus.HistogramVec
	tokens   prometheus.Counter
	// streamErrors counts requests that ended with a worker-side error
	// event after admission, by code: overflow (the client could not keep
	// up and the request was cancelled), worker_lost, and the rest.
	streamErrors *prometheus.CounterVec
}

// newMetrics registers the gateway's metrics. Every label is bounded: routes
// are the mux's patterns, models only those the catalog lists, statuses the
// few the gateway writes.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_http_requests_total",
			Help: "HTTP requests answered, by route, status and protocol (h3, h2, http/1.1).",
		}, []string{"route", "status", "protocol"}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "h3infer_http_in_flight_requests",
			Help: "HTTP requests being served.",
		}),
		ttft: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "h3infer_time_to_first_token_seconds",
			Help:    "Time from a completion request's arrival to its first generated token.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 12),
		}, []string{"model"}),
		tokens: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "h3infer_stream_tokens_total",
			Help: "Tokens received from workers for completion requests.",
		}),
		streamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_stream_errors_total",
			Help: "Completion requests that ended with an error event, by code (overflow: the client fell behind and the request was cancelled).",
		}, []string{"code"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.inFlight, m.ttft, m.tokens, m.streamErrors} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("gateway: register metrics: %w", err)
		}
	}
	return m, nil
}

// instrument counts requests by route, status and protocol.
func (g *Gateway) instrument(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.metrics.inFlight.Inc()
		defer g.metrics.inFlight.Dec()
		rec := &statusRecorder{ResponseWriter: w}
		next.ServeHTTP(rec, r)
		status := rec.status
		if status == 0 {
			status = http.StatusOK
			if r.Context().Err() != nil {
				status = statusClientClosed
			}
		}
		g.metrics.requests.WithLabelValues(routeLabel(r.Pattern), strconv.Itoa(status), protocolLabel(r)).Inc()
	})
}

// routeLabel keeps the label bounded: anything the mux did not route by a
// named pattern is "other".
func routeLabel(pattern string) string {
	switch pattern {
	case "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model...}":
		return pattern
	}
	return "other"
}

func protocolLabel(r *http.Request) string {
	switch r.ProtoMajor {
	case 3:
		return "h3"
	case 2:
		return "h2"
	}
	return "http/1.1"
}

// statusRecorder remembers the status a handler wrote. Unwrap lets
// http.ResponseController reach the real writer's Flush and deadlines.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 && code >= 200 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// errorCodeLabel keeps the stream error label bounded to the codes the
// transport defines.
func errorCodeLabel(code string) string {
	switch code {
	case transport.CodeOverflow, transport.CodeWorkerLost, transport.CodeInternal, transport.CodeCancelled,
		transport.CodeContextLength, transport.CodeModelNotFound, transport.CodeInvalidRequest:
		return code
	}
	return "other"
}
