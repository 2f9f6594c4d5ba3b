package gateway

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"h3infer/infer"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
)

// The gateway's metrics. Every label is bounded: routes are the mux's
// patterns, models only those the catalog lists, urgencies 0..7, tenants
// only those the rate-limit config names (others are "other"), statuses
// the few the gateway writes. The queue depth by urgency is the
// scheduler's to report; the wiring registers it (cmd/h3infer).

type metrics struct {
	requests   *prometheus.CounterVec
	inFlight   prometheus.Gauge
	ttft       *prometheus.HistogramVec
	interToken *prometheus.HistogramVec
	duration   *prometheus.HistogramVec
	queueWait  *prometheus.HistogramVec
	tokens     prometheus.Counter
	writes     *prometheus.HistogramVec
	merged     prometheus.Counter
	refusals   *prometheus.CounterVec
	quic       *quicCollector

	// limitStoreErrors counts failed calls to a shared rate-limit store,
	// limitFallback the decisions the local fallback made meanwhile.
	limitStoreErrors prometheus.Counter
	limitFallback    *prometheus.CounterVec

	early   *prometheus.CounterVec
	binding *prometheus.CounterVec
	// earlyHeaderIgnored counts Early-Data headers from peers that are
	// not configured intermediaries.
	earlyHeaderIgnored prometheus.Counter
	authFailures       *prometheus.CounterVec
	// streamErrors counts requests that ended with a worker-side error
	// event after admission, by code: overflow (the client could not keep
	// up and the request was cancelled), worker_lost, and the rest.
	streamErrors *prometheus.CounterVec
	// adminRefusals counts admin requests refused before any route ran.
	adminRefusals *prometheus.CounterVec
}

// latencyBuckets spans a decode step (tens of µs) to a long completion.
var latencyBuckets = prometheus.ExponentialBuckets(0.0005, 2, 18)

// newMetrics registers the gateway's metrics.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	byModel := []string{"model", "urgency"}
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
			Buckets: latencyBuckets,
		}, byModel),
		interToken: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "h3infer_inter_token_latency_seconds",
			Help:    "Time between two token events of one completion, as the gateway receives them.",
			Buckets: latencyBuckets,
		}, byModel),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "h3infer_request_duration_seconds",
			Help:    "Time from a completion request's arrival to its last byte, whatever the outcome.",
			Buckets: latencyBuckets,
		}, byModel),
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "h3infer_queue_wait_seconds",
			Help:    "Time a completion request waited for admission and a worker slot.",
			Buckets: latencyBuckets,
		}, byModel),
		tokens: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "h3infer_stream_tokens_total",
			Help: "Tokens received from workers for completion requests.",
		}),
		writes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "h3infer_stream_data_writes",
			Help:    "DATA writes (one per flush) per streamed response, by urgency; _sum over _count is the mean.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 11),
		}, []string{"urgency"}),
		merged: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "h3infer_stream_tokens_merged_total",
			Help: "Tokens whose text went out in the event of an earlier token, on a congested HTTP/3 connection (gateway.coalesce.merge).",
		}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_rate_limit_refusals_total",
			Help: "Requests refused or cut off by a rate limit, by tenant and limit (requests, tokens, concurrency).",
		}, []string{"tenant", "limit"}),
		limitStoreErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "h3infer_rate_limit_store_errors_total",
			Help: "Calls to the shared rate-limit store (Redis) that failed; the local fallback decided instead.",
		}),
		limitFallback: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_rate_limit_fallback_decisions_total",
			Help: "Rate-limit decisions made by this instance alone while the shared store failed, by result: admitted, refused.",
		}, []string{"result"}),
		quic: newQUICCollector(),
		early: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_early_data_requests_total",
			Help: "Requests that arrived before the handshake completed (or marked Early-Data: 1), by outcome: accepted, waited, rejected, replay_blocked.",
		}, []string{"outcome"}),
		binding: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_token_binding_total",
			Help: "Exporter-bound token proofs checked, by result: ok, failed.",
		}, []string{"result"}),
		earlyHeaderIgnored: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "h3infer_early_data_header_ignored_total",
			Help: "Requests whose Early-Data header was ignored because their peer is not in zero_rtt.trusted_proxies.",
		}),
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_auth_failures_total",
			Help: "Requests refused for their bearer token, by reason.",
		}, []string{"reason"}),
		streamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_stream_errors_total",
			Help: "Completion requests that ended with an error event, by code (overflow: the client fell behind and the request was cancelled).",
		}, []string{"code"}),
		adminRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_admin_refusals_total",
			Help: "Admin listener requests refused, by reason: host (a Host that is not the listener's, as after DNS rebinding), origin (sent by a page of another origin), content_type (a state change not sent as JSON), token (no or a wrong admin token).",
		}, []string{"reason"}),
	}
	for _, r := range []string{"host", "origin", "content_type", "token"} {
		m.adminRefusals.WithLabelValues(r)
	}
	for _, c := range []prometheus.Collector{m.requests, m.inFlight, m.ttft, m.interToken, m.duration,
		m.queueWait, m.tokens, m.writes, m.merged, m.refusals, m.limitStoreErrors, m.limitFallback, m.quic, m.early, m.binding, m.earlyHeaderIgnored, m.authFailures, m.streamErrors, m.adminRefusals} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("gateway: register metrics: %w", err)
		}
	}
	return m, nil
}

// instrument counts requests by route, status and protocol.
func (g *Gateway) instrument(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		growStack()
		g.metrics.inFlight.Inc()
		defer g.metrics.inFlight.Dec()
		r, span := g.serverSpan(r)
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
		endServerSpan(span, r, status)
	})
}

// routeLabel keeps the label bounded: anything the mux did not route by a
// named pattern is "other".
func routeLabel(pattern string) string {
	switch pattern {
	case "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model...}", "/tokenize", "/detokenize":
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

// quicCollector reports QUIC connection statistics. quic-go keeps them per
// connection, so the collector sums the live connections at scrape time
// and folds in each connection's final figures when it closes; the
// counters therefore never go backwards.
type quicCollector struct {
	opened, open, packetsSent, packetsRecv, packetsLost *prometheus.Desc
	bytesSent, bytesRecv, bytesLost                     *prometheus.Desc
	rtt                                                 prometheus.Histogram

	mu     sync.Mutex
	live   map[*quic.Conn]struct{}
	closed quic.ConnectionStats // sums of closed connections (RTT fields unused)
	total  uint64
}

func newQUICCollector() *quicCollector {
	d := func(name, help string) *prometheus.Desc { return prometheus.NewDesc(name, help, nil, nil) }
	return &quicCollector{
		opened:      d("h3infer_quic_connections_total", "QUIC connections accepted."),
		open:        d("h3infer_quic_connections_open", "QUIC connections open now."),
		packetsSent: d("h3infer_quic_packets_sent_total", "QUIC packets sent, retransmissions included."),
		packetsRecv: d("h3infer_quic_packets_received_total", "QUIC packets received; for token streams these are mostly the client's ACKs."),
		packetsLost: d("h3infer_quic_packets_lost_total", "QUIC packets declared lost."),
		bytesSent:   d("h3infer_quic_sent_bytes_total", "QUIC payload bytes sent."),
		bytesRecv:   d("h3infer_quic_received_bytes_total", "QUIC payload bytes received."),
		bytesLost:   d("h3infer_quic_lost_bytes_total", "QUIC payload bytes declared lost."),
		rtt: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "h3infer_quic_smoothed_rtt_seconds",
			Help:    "Smoothed RTT of each QUIC connection when it closed.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		live: map[*quic.Conn]struct{}{},
	}
}

// track follows c until it closes. context.AfterFunc runs the fold-in on
// the connection's own close, so no goroutine waits per connection.
func (q *quicCollector) track(c *quic.Conn) {
	q.mu.Lock()
	q.live[c] = struct{}{}
	q.total++
	q.mu.Unlock()
	context.AfterFunc(c.Context(), func() {
		s := c.ConnectionStats()
		q.mu.Lock()
		delete(q.live, c)
		q.closed = addQUICStats(q.closed, s)
		q.mu.Unlock()
		if s.SmoothedRTT > 0 {
			q.rtt.Observe(s.SmoothedRTT.Seconds())
		}
	})
}

func addQUICStats(a, b quic.ConnectionStats) quic.ConnectionStats {
	a.PacketsSent += b.PacketsSent
	a.PacketsReceived += b.PacketsReceived
	a.PacketsLost += b.PacketsLost
	a.BytesSent += b.BytesSent
	a.BytesReceived += b.BytesReceived
	a.BytesLost += b.BytesLost
	return a
}

func (q *quicCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{q.opened, q.open, q.packetsSent, q.packetsRecv, q.packetsLost, q.bytesSent, q.bytesRecv, q.bytesLost} {
		ch <- d
	}
	q.rtt.Describe(ch)
}

func (q *quicCollector) Collect(ch chan<- prometheus.Metric) {
	q.mu.Lock()
	sum := q.closed
	for c := range q.live {
		sum = addQUICStats(sum, c.ConnectionStats())
	}
	open, total := len(q.live), q.total
	q.mu.Unlock()
	counter := func(d *prometheus.Desc, v uint64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v))
	}
	counter(q.opened, total)
	ch <- prometheus.MustNewConstMetric(q.open, prometheus.GaugeValue, float64(open))
	counter(q.packetsSent, sum.PacketsSent)
	counter(q.packetsRecv, sum.PacketsReceived)
	counter(q.packetsLost, sum.PacketsLost)
	counter(q.bytesSent, sum.BytesSent)
	counter(q.bytesRecv, sum.BytesReceived)
	counter(q.bytesLost, sum.BytesLost)
	q.rtt.Collect(ch)
}

// sinceSeconds is the metric value of a duration.
func sinceSeconds(t time.Time) float64 { return time.Since(t).Seconds() }

// errorCodeLabel keeps the stream error label bounded to the codes the
// transport defines.
func errorCodeLabel(code string) string {
	switch code {
	case infer.CodeOverflow, infer.CodeWorkerLost, infer.CodeInternal, infer.CodeCancelled,
		infer.CodeContextLength, infer.CodeModelNotFound, infer.CodeInvalidRequest:
		return code
	}
	return "other"
}
