package upstream

import (
	"github.com/prometheus/client_golang/prometheus"
)

// The upstreams' metrics, every one labelled by the upstream's configured
// name (bounded by the config file). Outcomes and error kinds are the
// fixed sets below.
type metrics struct {
	requests  *prometheus.CounterVec // upstream, outcome
	errors    *prometheus.CounterVec // upstream, kind
	inFlight  *prometheus.GaugeVec
	up        *prometheus.GaugeVec
	ttft      *prometheus.HistogramVec
	cancelled *prometheus.CounterVec
	ejections *prometheus.CounterVec
}

// Outcomes of a request (requests_total's outcome label).
const (
	outcomeOK        = "ok"
	outcomeError     = "error"
	outcomeCancelled = "cancelled"
)

// Kinds of failure (errors_total's kind label).
const (
	kindConnect       = "connect"         // dial, TLS, reset or closed before the response's headers
	kindStall         = "stall"           // no headers, or no event, within stall_timeout
	kindTimeout       = "timeout"         // the whole request ran past timeout
	kindRateLimited   = "rate_limited"    // 429
	kindOverloaded    = "overloaded"      // 503
	kindModelNotFound = "model_not_found" // 404 naming the model
	kindInvalid       = "invalid_request" // 400, 422
	kindAuth          = "auth"            // 401, 403: our credential is wrong
	kindStatus        = "status"          // any other unexpected status, 5xx included
	kindStream        = "stream"          // the stream broke or ended without [DONE]
	kindMalformed     = "malformed"       // an event that is not the JSON it should be, or too long a line
	kindUpstreamError = "upstream_error"  // the stream carried an error event
	kindOverflow      = "overflow"        // the consumer fell behind the call's buffer
	kindProbe         = "probe"           // the health probe (GET /v1/models) failed
)

// latencyBuckets spans a loopback first token (a millisecond) to a
// long prefill on a busy remote server.
var latencyBuckets = prometheus.ExponentialBuckets(0.001, 2, 16)

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	byName := []string{"upstream"}
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_upstream_requests_total",
			Help: "Requests sent to an upstream server, by outcome: ok, error, cancelled.",
		}, []string{"upstream", "outcome"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_upstream_errors_total",
			Help: "Failed requests and probes of an upstream server, by kind: connect, stall, timeout, rate_limited, overloaded, model_not_found, invalid_request, auth, status, stream, malformed, upstream_error, overflow, probe.",
		}, []string{"upstream", "kind"}),
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "h3infer_upstream_in_flight_requests",
			Help: "Requests in flight to an upstream server.",
		}, byName),
		up: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "h3infer_upstream_up",
			Help: "1 while the upstream server takes requests, 0 while it is ejected after consecutive failures.",
		}, byName),
		ttft: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "h3infer_upstream_time_to_first_token_seconds",
			Help:    "Time from sending a request to an upstream server to its first token.",
			Buckets: latencyBuckets,
		}, byName),
		cancelled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_upstream_cancelled_total",
			Help: "Requests cancelled while the upstream server was still answering them; their streams were reset so that it stops generating.",
		}, byName),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_upstream_ejections_total",
			Help: "Times the upstream server was taken out of dispatch after eject_after consecutive failures.",
		}, byName),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.requests, m.errors, m.inFlight, m.up, m.ttft, m.cancelled, m.ejections} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
