package gateway

import (
	"fmt"
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	requests *prometheus.CounterVec
	inFlight prometheus.Gauge
	ttft     *prometheus.HistogramVec
	tokens   prometheus.Counter
	writes   *prometheus.HistogramVec
	quic     *quicStats

	early        *prometheus.CounterVec
	binding      *prometheus.CounterVec
	authFailures *prometheus.CounterVec
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
		writes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "h3infer_stream_data_writes",
			Help:    "DATA writes (one per flush) per streamed response, by urgency; _sum over _count is the mean.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 11),
		}, []string{"urgency"}),
		quic: newQUICStats(),
		early: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_early_data_requests_total",
			Help: "Requests that arrived before the handshake completed (or marked Early-Data: 1), by outcome: accepted, waited, rejected, replay_blocked.",
		}, []string{"outcome"}),
		binding: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_token_binding_total",
			Help: "Exporter-bound token proofs checked, by result: ok, failed.",
		}, []string{"result"}),
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_auth_failures_total",
			Help: "Requests refused for their bearer token, by reason.",
		}, []string{"reason"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.inFlight, m.ttft, m.tokens, m.writes, m.quic, m.early, m.binding, m.authFailures} {
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
