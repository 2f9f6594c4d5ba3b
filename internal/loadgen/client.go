package loadgen

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// Error kinds a Sample can carry; "status_NNN" covers HTTP error statuses.
const (
	ErrConnect      = "connect"       // dial or handshake failed
	ErrTimeout      = "timeout"       // the request outlived Config.Timeout
	ErrStream       = "stream"        // the stream broke after it started
	ErrProtocol     = "protocol"      // wrong protocol negotiated or malformed events
	ErrNoDone       = "no_done"       // the stream ended without [DONE]
	ErrServerEvent  = "server_error"  // an error event inside the stream
	ErrZeroRTT      = "0rtt_rejected" // the server refused the early data
	ErrDropped      = "dropped"       // open loop: Concurrency requests were already in flight
	ErrCancelled    = "cancelled"     // the run was interrupted
	completionsPath = "/v1/chat/completions"
)

// Sample is what one request measured. Durations count from the moment
// the request was started, connection set-up included.
type Sample struct {
	// Start is when the request started, from the start of the run.
	Start   time.Duration `json:"start_ns"`
	Urgency int           `json:"urgency"`
	// TTFT is zero for a completion that ended without content.
	TTFT time.Duration   `json:"ttft_ns"`
	E2E  time.Duration   `json:"e2e_ns"`
	ITL  []time.Duration `json:"-"`
	// Tokens is the completion tokens the server reported in usage, else
	// the content events counted.
	Tokens int `json:"tokens"`
	// Early reports a request the gateway served in 0-RTT, before the
	// handshake completed; Retried one whose 0-RTT attempt was refused
	// and sent again in 1-RTT (both only through package client).
	Early   bool `json:"early,omitempty"`
	Retried bool `json:"retried,omitempty"`
	// Err is empty for a request that streamed to [DONE], else its kind.
	Err    string `json:"err,omitempty"`
	Detail string `json:"-"`
	// RetryAfter is the Retry-After of a refusal (503 or 429) in whole
	// seconds as the server sent it; -1 when the header was missing or not
	// a number of seconds. A refusal's E2E is the time to its response
	// headers, the latency a refused client waits before it can go
	// elsewhere.
	RetryAfter int `json:"retry_after_s,omitempty"`
}

// Refused reports a request the server turned away for load: a 503 or a
// 429, which a client retries after Retry-After, unlike other errors.
func (s Sample) Refused() bool {
	return s.Err == refusedOverloaded || s.Err == refusedRateLimited
}

var (
	refusedOverloaded  = fmt.Sprintf("status_%d", http.StatusServiceUnavailable)
	refusedRateLimited = fmt.Sprintf("status_%d", http.StatusTooManyRequests)
)

// client sends requests the way Config asks: over shared connections, or
// a new one per request.
type client struct {
	cfg      Config
	endpoint string
	host     string // host:port for dialing
	tls      *tls.Config
	shared   *http.Client
	// early holds one h3infer client per concurrent slot when requests go
	// in 0-RTT (Config.usesEarlyClient).
	early   chan *earlyClient
	closers []func()
}

func newClient(cfg Config) (*client, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("url: %w", err)
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), "443")
	}
	base := &tls.Config{}
	if cfg.TLS != nil {
		base = cfg.TLS.Clone()
	}
	base.ClientSessionCache = nil
	if cfg.ZeroRTT {
		base.ClientSessionCache = tls.NewLRUClientSessionCache(64)
	}
	c := &client{cfg: cfg, endpoint: strings.TrimSuffix(cfg.URL, "/") + completionsPath, host: host}
	switch cfg.Proto {
	case ProtoH3:
		base.NextProtos = []string{http3.NextProtoH3}
	case ProtoH2:
		base.NextProtos = []string{"h2"}
	case ProtoH1:
		base.NextProtos = []string{"http/1.1"}
	}
	c.tls = base
	if cfg.usesEarlyClient() {
		if c.early, err = newEarlyClients(cfg, base); err != nil {
			return nil, err
		}
		c.closers = append(c.closers, func() {
			for range cfg.Concurrency {
				(<-c.early).cl.Close()
			}
		})
		return c, nil
	}
	if !cfg.NewConnection {
		rt := c.transport()
		c.shared = &http.Client{Transport: rt}
		c.closers = append(c.closers, closeTransport(rt))
	}
	return c, nil
}

// transport is a round tripper for cfg.Proto with its own connections.
func (c *client) transport() http.RoundTripper {
	switch c.cfg.Proto {
	case ProtoH3:
		return &http3.Transport{TLSClientConfig: c.tls, QUICConfig: c.quicConfig()}
	case ProtoH2:
		// One connection, as h3 uses: without the bound, requests that
		// start together each dial their own before the first is up.
		return &http.Transport{TLSClientConfig: c.tls, ForceAttemptHTTP2: true, MaxIdleConnsPerHost: c.cfg.Concurrency, MaxConnsPerHost: 1}
	default:
		return &http.Transport{
			TLSClientConfig:     c.tls,
			TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{}, // no h2
			MaxIdleConnsPerHost: c.cfg.Concurrency,
		}
	}
}

// quicConfig allows enough concurrent streams for the largest loads the
// bench runs on one connection.
func (c *client) quicConfig() *quic.Config {
	return &quic.Config{MaxIncomingStreams: 4096, KeepAlivePeriod: 10 * time.Second, Tracer: c.cfg.QUICTracer}
}

func closeTransport(rt http.RoundTripper) func() {
	return func() {
		switch t := rt.(type) {
		case *http3.Transport:
			t.Close()
		case *http.Transport:
			t.CloseIdleConnections()
		}
	}
}

func (c *client) close() {
	for _, f := range c.closers {
		f()
	}
}

// chatRequest is the body every request sends.
type chatRequest struct {
	Model         string        `json:"model"`
	Messages      []chatMessage `json:"messages"`
	MaxTokens     int           `json:"max_tokens"`
	IgnoreEOS     bool          `json:"ignore_eos,omitempty"`
	Stream        bool          `json:"stream"`
	StreamOptions struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

type chatMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// promptOf is a prompt of n words.
func promptOf(n int) string {
	words := []string{"the", "gateway", "streams", "tokens", "over", "quic", "to", "every", "client"}
	var b strings.Builder
	for i := range n {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(words[i%len(words)])
	}
	return b.String()
}

// payload is a request body.
func (c *client) payload(promptWords, maxTokens int) []byte {
	body := chatRequest{
		Model:     c.cfg.Model,
		Messages:  []chatMessage{{Role: "user", Content: promptOf(promptWords)}},
		MaxTokens: maxTokens,
		IgnoreEOS: c.cfg.IgnoreEOS,
		Stream:    true,
	}
	body.StreamOptions.IncludeUsage = true
	payload, _ := json.Marshal(body)
	return payload
}

// do sends one streamed chat completion and measures it.
func (c *client) do(ctx context.Context, promptWords, maxTokens, urgency int) Sample {
	if c.early != nil {
		return c.doEarly(ctx, promptWords, maxTokens, urgency)
	}
	s := Sample{Urgency: urgency}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.endpoint, bytes.NewReader(c.payload(promptWords, maxTokens)))
	if err != nil {
		s.Err, s.Detail = ErrProtocol, err.Error()
		return s
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	if c.cfg.Bearer != "" {
		req.Header.Set("Authorization", "Bearer "+c.cfg.Bearer)
	}
	if urgency >= 0 {
		req.Header.Set("Priority", fmt.Sprintf("u=%d", urgency))
	}

	start := time.Now()
	var resp *http.Response
	switch {
	case c.shared != nil:
		resp, err = c.shared.Do(req)
	case c.cfg.Proto == ProtoH3:
		var done func()
		resp, done, err = c.doH3NewConn(ctx, req)
		if done != nil {
			defer done()
		}
	default:
		rt := c.transport()
		defer closeTransport(rt)()
		resp, err = (&http.Client{Transport: rt}).Do(req)
	}
	if err != nil {
		s.E2E = time.Since(start)
		s.Err, s.Detail = classify(ctx, err, ErrConnect), err.Error()
		return s
	}
	defer resp.Body.Close()
	c.finish(ctx, resp, start, &s)
	return s
}

// finish checks a response and reads its stream into s.
func (c *client) finish(ctx context.Context, resp *http.Response, start time.Time, s *Sample) {
	if want := map[string]int{ProtoH3: 3, ProtoH2: 2, ProtoH1: 1}[c.cfg.Proto]; resp.ProtoMajor != want {
		s.Err, s.Detail = ErrProtocol, "negotiated "+resp.Proto
		return
	}
	if resp.StatusCode != http.StatusOK {
		s.E2E = time.Since(start) // the headers, before the error body
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		s.Err, s.Detail = fmt.Sprintf("status_%d", resp.StatusCode), resp.Status
		if s.Refused() {
			s.RetryAfter = -1
			if n, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && n >= 0 {
				s.RetryAfter = n
			}
		}
		return
	}
	readStream(ctx, resp.Body, start, s)
}

// doH3NewConn sends req on a connection of its own, dialed with early
// data enabled so that a resumed session can use 0-RTT. quic-go's client
// sends only GET and HEAD as early data and holds a POST until the
// handshake completes, so here a completion gains resumption (no
// certificate chain) but not the saved round trip; doEarly is the path
// that sends the POST early.
func (c *client) doH3NewConn(ctx context.Context, req *http.Request) (*http.Response, func(), error) {
	conn, err := quic.DialAddrEarly(ctx, c.host, c.tls, c.quicConfig())
	if err != nil {
		return nil, nil, err
	}
	done := func() { conn.CloseWithError(0, "") }
	resp, err := (&http3.Transport{}).NewClientConn(conn).RoundTrip(req)
	return resp, done, err
}

// classify names the kind of a transport error.
func classify(ctx context.Context, err error, otherwise string) string {
	switch {
	case errors.Is(err, quic.Err0RTTRejected):
		return ErrZeroRTT
	case errors.Is(ctx.Err(), context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		return ErrTimeout
	case errors.Is(err, context.Canceled):
		return ErrCancelled
	}
	return otherwise
}

// event is the part of a streamed chunk the generator reads.
type event struct {
	Choices []struct {
		Delta struct {
			Content *string `json:"content"`
		} `json:"delta"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	Error *struct {
		Message string `json:"message"`
	} `json:"error"`
}

// readStream reads server-sent events to [DONE], timing each content
// event.
func readStream(ctx context.Context, body io.Reader, start time.Time, s *Sample) {
	r := bufio.NewReaderSize(body, 16<<10)
	var last time.Time
	events, usage, finished := 0, -1, false
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			s.E2E = time.Since(start)
			if s.Err != "" {
				return // an error event said why already
			}
			if errors.Is(err, io.EOF) {
				s.Err = ErrNoDone
			} else {
				s.Err, s.Detail = classify(ctx, err, ErrStream), err.Error()
			}
			return
		}
		data, ok := bytes.CutPrefix(bytes.TrimRight(line, "\r\n"), []byte("data: "))
		if !ok {
			continue // blank separators, comments
		}
		now := time.Now()
		if string(data) == "[DONE]" {
			s.E2E = now.Sub(start)
			s.Tokens = events
			if usage >= 0 {
				s.Tokens = usage
			}
			// A model may end at once (its end token first): a finish
			// reason with no content is an answer, but [DONE] with
			// neither is not.
			if events == 0 && !finished && s.Err == "" {
				s.Err, s.Detail = ErrProtocol, "no content or finish reason before [DONE]"
			}
			return
		}
		var ev event
		if err := json.Unmarshal(data, &ev); err != nil {
			s.Err, s.Detail = ErrProtocol, "bad event: "+err.Error()
			continue
		}
		if ev.Error != nil {
			s.Err, s.Detail = ErrServerEvent, ev.Error.Message
			continue
		}
		if ev.Usage != nil {
			usage = ev.Usage.CompletionTokens
		}
		for _, ch := range ev.Choices {
			if ch.FinishReason != nil && *ch.FinishReason != "" {
				finished = true
			}
			if ch.Delta.Content == nil || *ch.Delta.Content == "" {
				continue // the role announcement and the finish chunk
			}
			if events == 0 {
				s.TTFT = now.Sub(start)
			} else {
				s.ITL = append(s.ITL, now.Sub(last))
			}
			last = now
			events++
		}
	}
}
