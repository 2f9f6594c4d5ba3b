package loadgen

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/qlogwriter"
)

// Protocols the generator speaks.
const (
	ProtoH3 = "h3"
	ProtoH2 = "h2"
	ProtoH1 = "h1"
)

// Config describes one load run. Zero values mean the documented defaults.
type Config struct {
	// URL is the endpoint's base, such as https://127.0.0.1:8443; requests
	// go to URL + /v1/chat/completions.
	URL string
	// Proto is h3 (default), h2 or h1.
	Proto string
	// Model is the model field of every request. Default "demo".
	Model string
	// Bearer, when set, is sent as "Authorization: Bearer ..." on every
	// request.
	Bearer string
	// TLS is the client's TLS configuration (roots, server name); nil means
	// the system roots. Its ClientSessionCache is replaced per run.
	TLS *tls.Config
	// QUICTracer, when set, traces every h3 connection the run opens
	// (`bench --qlog`: package qlogdir).
	QUICTracer func(context.Context, bool, quic.ConnectionID) qlogwriter.Trace
	// Concurrency is how many requests are in flight at once in closed
	// loop, and the bound on in-flight requests with Rate. Default 1.
	Concurrency int
	// Rate, when > 0, starts requests at this mean rate per second with
	// exponential gaps (an open-loop Poisson process) instead of a closed
	// loop; requests that would exceed Concurrency in flight are counted
	// as dropped.
	Rate float64
	// HonourRetryAfter makes each client of a closed loop wait out a
	// refusal's Retry-After before its next request, as the OpenAI SDKs
	// do, instead of sending it at once: a closed loop that retries a
	// refusal at once measures how fast the server refuses, not how much
	// it serves.
	HonourRetryAfter bool
	// Requests and Duration bound the run; whichever is reached first ends
	// it. At least one must be set.
	Requests int
	Duration time.Duration
	// PromptWords and OutputTokens draw each request's prompt length (in
	// words) and max_tokens. Defaults: fixed 32 and fixed 64.
	PromptWords  Dist
	OutputTokens Dist
	// IgnoreEOS asks the server to generate every request's max_tokens,
	// past the model's end tokens (the ignore_eos extension h3infer
	// accepts), so that OutputTokens is the distribution served.
	IgnoreEOS bool
	// Urgency draws each request's RFC 9218 urgency (the Priority header);
	// nil sends no Priority header.
	Urgency *UrgencyMix
	// NewConnection opens a fresh connection for every request, so each
	// time to first token includes the handshake.
	NewConnection bool
	// ZeroRTT keeps TLS session tickets between connections, so a new
	// connection resumes. Over h3 with Credential set, requests go through
	// h3infer's client package, which sends the completion POST in 0-RTT
	// with a single-use early proof; the run first sends one unmeasured
	// request per concurrent slot to obtain a ticket, and every Sample says
	// whether it was served early. Without Credential (or over h2/h1) only
	// the handshake is shortened: quic-go's own client sends only GET and
	// HEAD as early data. Without ZeroRTT every new connection does a full
	// handshake.
	ZeroRTT bool
	// Credential is the full credential `h3infer token issue` prints
	// (bearer and secret); the secret keys the early proofs. It replaces
	// Bearer where it is used.
	Credential string
	// Timeout bounds one request. Default 60s.
	Timeout time.Duration
}

// Defaults of Config.
const (
	DefaultModel   = "demo"
	DefaultTimeout = 60 * time.Second
)

func (c Config) withDefaults() Config {
	if c.Proto == "" {
		c.Proto = ProtoH3
	}
	if c.Model == "" {
		c.Model = DefaultModel
	}
	if c.Concurrency == 0 {
		c.Concurrency = 1
	}
	if c.PromptWords.Kind == "" {
		c.PromptWords = Dist{Kind: DistFixed, A: 32}
	}
	if c.OutputTokens.Kind == "" {
		c.OutputTokens = Dist{Kind: DistFixed, A: 64}
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	return c
}

// Validate reports every problem at once, each naming its flag.
func (c Config) Validate() error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, a...)))
	}
	if !strings.HasPrefix(c.URL, "https://") {
		bad("url", "want an https:// URL, got %q", c.URL)
	}
	switch c.Proto {
	case "", ProtoH3, ProtoH2, ProtoH1:
	default:
		bad("proto", "want h3, h2 or h1, got %q", c.Proto)
	}
	if c.Concurrency < 0 {
		bad("concurrency", "must be >= 1, got %d", c.Concurrency)
	}
	if c.Rate < 0 || math.IsNaN(c.Rate) || math.IsInf(c.Rate, 0) {
		bad("rate", "must be >= 0, got %v", c.Rate)
	}
	if c.Requests < 0 {
		bad("requests", "must be >= 0, got %d", c.Requests)
	}
	if c.Duration < 0 {
		bad("duration", "must be >= 0, got %s", c.Duration)
	}
	if c.Requests == 0 && c.Duration == 0 {
		bad("requests", "set requests, duration or both to bound the run")
	}
	if c.Timeout < 0 {
		bad("timeout", "must be >= 0, got %s", c.Timeout)
	}
	if c.ZeroRTT && !c.NewConnection {
		bad("0rtt", "needs new-conn: 0-RTT only happens on a new connection")
	}
	return errors.Join(errs...)
}

// Distribution kinds.
const (
	DistFixed   = "fixed"   // always A
	DistUniform = "uniform" // A..B inclusive
	DistExp     = "exp"     // exponential with mean A, at least 1
)

// Dist is a distribution of positive integers, written "64" (fixed),
// "16-256" (uniform) or "exp:64" (exponential with that mean).
type Dist struct {
	Kind string
	A, B int
}

// ParseDist reads a Dist.
func ParseDist(s string) (Dist, error) {
	if mean, ok := strings.CutPrefix(s, "exp:"); ok {
		n, err := strconv.Atoi(mean)
		if err != nil || n < 1 {
			return Dist{}, fmt.Errorf("want exp:MEAN with MEAN >= 1, got %q", s)
		}
		return Dist{Kind: DistExp, A: n}, nil
	}
	if lo, hi, ok := strings.Cut(s, "-"); ok {
		a, err1 := strconv.Atoi(lo)
		b, err2 := strconv.Atoi(hi)
		if err1 != nil || err2 != nil || a < 1 || b < a {
			return Dist{}, fmt.Errorf("want MIN-MAX with 1 <= MIN <= MAX, got %q", s)
		}
		return Dist{Kind: DistUniform, A: a, B: b}, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		return Dist{}, fmt.Errorf("want N >= 1, MIN-MAX or exp:MEAN, got %q", s)
	}
	return Dist{Kind: DistFixed, A: n}, nil
}

func (d Dist) String() string {
	switch d.Kind {
	case DistUniform:
		return fmt.Sprintf("%d-%d", d.A, d.B)
	case DistExp:
		return fmt.Sprintf("exp:%d", d.A)
	}
	return strconv.Itoa(d.A)
}

func (d Dist) draw(r *rand.Rand) int {
	switch d.Kind {
	case DistUniform:
		return d.A + r.IntN(d.B-d.A+1)
	case DistExp:
		return max(1, int(math.Round(r.ExpFloat64()*float64(d.A))))
	}
	return d.A
}

// UrgencyMix draws urgencies 0..7 with the given weights, written
// "0:1,3:8,7:1".
type UrgencyMix struct {
	weights [8]int
	total   int
}

// ParseUrgencyMix reads an UrgencyMix.
func ParseUrgencyMix(s string) (*UrgencyMix, error) {
	m := &UrgencyMix{}
	for part := range strings.SplitSeq(s, ",") {
		u, w, ok := strings.Cut(strings.TrimSpace(part), ":")
		ui, err1 := strconv.Atoi(u)
		wi, err2 := strconv.Atoi(w)
		if !ok || err1 != nil || err2 != nil || ui < 0 || ui > 7 || wi < 0 {
			return nil, fmt.Errorf("want URGENCY:WEIGHT pairs with urgency 0..7, such as 0:1,3:8, got %q", part)
		}
		m.weights[ui] += wi
		m.total += wi
	}
	if m.total == 0 {
		return nil, fmt.Errorf("urgency mix %q has no weight", s)
	}
	return m, nil
}

func (m *UrgencyMix) String() string {
	var parts []string
	for u, w := range m.weights {
		if w > 0 {
			parts = append(parts, fmt.Sprintf("%d:%d", u, w))
		}
	}
	return strings.Join(parts, ",")
}

func (m *UrgencyMix) draw(r *rand.Rand) int {
	n := r.IntN(m.total)
	for u, w := range m.weights {
		if n < w {
			return u
		}
		n -= w
	}
	return 7
}
