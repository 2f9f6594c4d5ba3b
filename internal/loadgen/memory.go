package loadgen

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// MemoryConfig describes a memory run: the resident memory of one server
// process measured while the generator holds idle HTTP/3 connections to
// it, then while streams run on them.
type MemoryConfig struct {
	// URL is the endpoint's base, as in Config.
	URL string
	// TLS is the client's TLS configuration (roots, server name).
	TLS *tls.Config
	// Bearer, when set, authorizes every request.
	Bearer string
	// Model is the model field of the streams' requests. Default "demo".
	Model string
	// PID is the process whose resident memory is read from /proc.
	PID int
	// Conns are the numbers of idle connections held, in ascending order;
	// each level opens the connections it adds to the previous one.
	Conns []int
	// Streams, when > 0, is how many streamed completions are opened,
	// one per connection in turn, over the connections of the last level,
	// and held open while the memory is read.
	Streams int
	// StreamTokens is each stream's max_tokens: long enough, at the
	// server's pace, to outlast the reading. Default 200.
	StreamTokens int
	// Parallel bounds the handshakes in flight. Default 32.
	Parallel int
	// Settle is how long memory is left to settle before it is read.
	// Default 2s.
	Settle time.Duration
	// StepTimeout bounds opening one level's connections or the streams.
	// Default 5m.
	StepTimeout time.Duration
}

// Defaults of MemoryConfig.
const (
	DefaultStreamTokens = 200
	defaultParallel     = 32
	defaultSettle       = 2 * time.Second
	defaultStepTimeout  = 5 * time.Minute
	rssSamples          = 5
	rssSampleGap        = 200 * time.Millisecond
)

// MemoryStep is the server's memory at one step of a memory run.
type MemoryStep struct {
	// Conns is the connections held, Alive those of them still open when
	// the memory was read; Streams the streams running then.
	Conns   int `json:"conns"`
	Alive   int `json:"alive"`
	Streams int `json:"streams"`
	// RSS is the process's resident set in bytes (median of a few reads).
	RSS int64 `json:"rss_bytes"`
	// PerUnit is the growth over the step it is compared with, divided by
	// what was added: bytes per connection over the baseline for a
	// connection level, bytes per stream over the idle connections for
	// the streams step.
	PerUnit float64 `json:"bytes_per_unit"`
	// Opened is how long opening the step's connections or streams took,
	// Retries how many connections had to be dialed again (a timed-out
	// handshake on a busy machine), counted over the run so far.
	Opened  time.Duration `json:"opened_ns"`
	Retries int64         `json:"retries"`
	// ClientRSS is the load generator's own resident set then: what the
	// client side of the connections costs, for sizing a larger run.
	ClientRSS int64 `json:"client_rss_bytes"`
	// Lost counts the held connections closed before the memory was
	// read, by the error that closed them.
	Lost map[string]int `json:"lost,omitempty"`
}

// MemoryResult is a memory run.
type MemoryResult struct {
	PID         int          `json:"pid"`
	BaselineRSS int64        `json:"baseline_rss_bytes"`
	Steps       []MemoryStep `json:"steps"`
}

// Validate reports every problem at once, each naming its flag.
func (c MemoryConfig) Validate() error {
	var errs []error
	if !strings.HasPrefix(c.URL, "https://") {
		errs = append(errs, fmt.Errorf("url: want an https:// URL, got %q", c.URL))
	}
	if c.PID <= 0 {
		errs = append(errs, fmt.Errorf("mem-pid: want the server's process id, got %d", c.PID))
	}
	if len(c.Conns) == 0 {
		errs = append(errs, errors.New("mem-conns: want at least one connection count"))
	}
	for i, n := range c.Conns {
		if n < 1 || (i > 0 && n <= c.Conns[i-1]) {
			errs = append(errs, fmt.Errorf("mem-conns: want ascending counts >= 1, got %v", c.Conns))
			break
		}
	}
	if c.Streams < 0 {
		errs = append(errs, fmt.Errorf("mem-streams: must be >= 0, got %d", c.Streams))
	}
	if c.StreamTokens < 0 || c.Parallel < 0 || c.Settle < 0 || c.StepTimeout < 0 {
		errs = append(errs, errors.New("mem-*: stream tokens, parallel, settle and timeout must be >= 0"))
	}
	return errors.Join(errs...)
}

// ReadRSS is the resident set of process pid in bytes, from
// /proc/PID/status (VmRSS, in kB).
func ReadRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("rss of %d: %w", pid, err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		v, ok := strings.CutPrefix(line, "VmRSS:")
		if !ok {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("rss of %d: bad VmRSS %q", pid, v)
		}
		return kb << 10, nil
	}
	return 0, fmt.Errorf("rss of %d: no VmRSS in /proc/%d/status", pid, pid)
}

// settledRSS waits d, then returns the median of a few reads, so that one
// read caught in the middle of a collection does not make the figure.
func settledRSS(ctx context.Context, pid int, d time.Duration) (int64, error) {
	if err := sleep(ctx, d); err != nil {
		return 0, err
	}
	var rs []int64
	for i := range rssSamples {
		if i > 0 {
			if err := sleep(ctx, rssSampleGap); err != nil {
				return 0, err
			}
		}
		r, err := ReadRSS(pid)
		if err != nil {
			return 0, err
		}
		rs = append(rs, r)
	}
	slices.Sort(rs)
	return rs[len(rs)/2], nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// heldConn is one idle connection and its HTTP/3 client.
type heldConn struct {
	conn *quic.Conn
	cc   *http3.ClientConn
}

// memoryRun holds what a memory run opened, all over one UDP socket.
type memoryRun struct {
	cfg   MemoryConfig
	base  string
	addr  *net.UDPAddr
	tls   *tls.Config
	tr    *quic.Transport
	h3    *http3.Transport
	conns []heldConn
	// retries counts connections dialed again after a failed attempt,
	// failed those that failed every attempt, in the current level.
	retries, failed atomic.Int64
}

// dialAttempts bounds the tries of one connection.
const dialAttempts = 3

// RunMemory measures the server's resident memory before any connection,
// at each level of idle connections, and with the streams running. It
// closes everything it opened before it returns.
func RunMemory(ctx context.Context, cfg MemoryConfig) (*MemoryResult, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Model == "" {
		cfg.Model = DefaultModel
	}
	if cfg.StreamTokens == 0 {
		cfg.StreamTokens = DefaultStreamTokens
	}
	if cfg.Parallel == 0 {
		cfg.Parallel = defaultParallel
	}
	if cfg.Settle == 0 {
		cfg.Settle = defaultSettle
	}
	if cfg.StepTimeout == 0 {
		cfg.StepTimeout = defaultStepTimeout
	}
	u, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("url: %w", err)
	}
	port := u.Port()
	if port == "" {
		port = "443"
	}
	addr, err := net.ResolveUDPAddr("udp", net.JoinHostPort(u.Hostname(), port))
	if err != nil {
		return nil, fmt.Errorf("url: %w", err)
	}
	// One socket for every connection: the client needs no descriptor per
	// connection, and the server sees them all from one address, told
	// apart by connection ID as QUIC intends.
	udp, err := net.ListenUDP("udp", nil)
	if err != nil {
		return nil, fmt.Errorf("memory: client socket: %w", err)
	}
	t := &tls.Config{}
	if cfg.TLS != nil {
		t = cfg.TLS.Clone()
	}
	t.NextProtos = []string{http3.NextProtoH3}
	t.ClientSessionCache = nil // every connection a full handshake
	r := &memoryRun{
		cfg: cfg, base: strings.TrimSuffix(cfg.URL, "/"), addr: addr, tls: t,
		tr: &quic.Transport{Conn: udp}, h3: &http3.Transport{},
	}
	defer func() {
		for _, c := range r.conns {
			c.conn.CloseWithError(0, "")
		}
		r.tr.Close()
		udp.Close()
	}()

	res := &MemoryResult{PID: cfg.PID}
	if res.BaselineRSS, err = settledRSS(ctx, cfg.PID, cfg.Settle); err != nil {
		return nil, err
	}
	for _, n := range cfg.Conns {
		start := time.Now()
		if err := r.open(ctx, n-len(r.conns)); err != nil {
			return res, err
		}
		step := MemoryStep{Conns: len(r.conns), Opened: time.Since(start)}
		if step.RSS, err = settledRSS(ctx, cfg.PID, cfg.Settle); err != nil {
			return res, err
		}
		step.Alive, step.Retries, step.Lost = r.alive(), r.retries.Load(), r.lost()
		step.ClientRSS, _ = ReadRSS(os.Getpid())
		step.PerUnit = float64(step.RSS-res.BaselineRSS) / float64(step.Conns)
		res.Steps = append(res.Steps, step)
	}
	if cfg.Streams > 0 {
		idle := res.Steps[len(res.Steps)-1]
		step, err := r.streams(ctx, idle)
		if err != nil {
			return res, err
		}
		res.Steps = append(res.Steps, step)
	}
	return res, nil
}

// alive counts the held connections still open.
func (r *memoryRun) alive() int {
	n := 0
	for _, c := range r.conns {
		if c.conn.Context().Err() == nil {
			n++
		}
	}
	return n
}

// lost counts the held connections that have closed, by cause.
func (r *memoryRun) lost() map[string]int {
	var m map[string]int
	for _, c := range r.conns {
		if c.conn.Context().Err() == nil {
			continue
		}
		if m == nil {
			m = map[string]int{}
		}
		m[context.Cause(c.conn.Context()).Error()]++
	}
	return m
}

// open adds n connections, each with a completed handshake and one
// answered GET /v1/models, Parallel at a time.
func (r *memoryRun) open(ctx context.Context, n int) error {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.StepTimeout)
	defer cancel()
	r.failed.Store(0)
	out := make([]heldConn, n)
	errs := make([]error, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(r.cfg.Parallel, n) {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				// A handshake can time out when the machine is saturated
				// by the others; that says nothing about memory, so it is
				// retried, and counted.
				for attempt := range dialAttempts {
					if attempt > 0 {
						r.retries.Add(1)
					}
					if out[i], errs[i] = r.dial(ctx); errs[i] == nil || ctx.Err() != nil {
						break
					}
				}
				// A connection that failed every attempt is left out
				// (counted); more than one in a hundred ends the level.
				if errs[i] != nil && ctx.Err() == nil && r.failed.Add(1) > int64(n/100) {
					cancel()
				}
			}
		})
	}
	wg.Wait()
	for _, c := range out {
		if c.conn != nil {
			r.conns = append(r.conns, c)
		}
	}
	if f := r.failed.Load(); f > int64(n/100) {
		return fmt.Errorf("memory: opening %d connections: %d failed: %w", n, f, errors.Join(errs...))
	}
	if err := ctx.Err(); err != nil && len(out) > 0 && out[n-1].conn == nil {
		return fmt.Errorf("memory: opening %d connections: %w", n, err)
	}
	return nil
}

// dial opens one connection and proves it serves HTTP/3.
func (r *memoryRun) dial(ctx context.Context) (heldConn, error) {
	conn, err := r.tr.Dial(ctx, r.addr, r.tls, &quic.Config{
		// Idle connections outlive the server's idle timeout only if
		// something crosses them.
		KeepAlivePeriod: 10 * time.Second,
		MaxIdleTimeout:  time.Minute,
	})
	if err != nil {
		return heldConn{}, fmt.Errorf("dial: %w", err)
	}
	h := heldConn{conn: conn, cc: r.h3.NewClientConn(conn)}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.base+"/v1/models", nil)
	if err != nil {
		conn.CloseWithError(0, "")
		return heldConn{}, err
	}
	if r.cfg.Bearer != "" {
		req.Header.Set("Authorization", "Bearer "+r.cfg.Bearer)
	}
	resp, err := h.cc.RoundTrip(req)
	if err != nil {
		conn.CloseWithError(0, "")
		return heldConn{}, fmt.Errorf("GET /v1/models: %w", err)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		conn.CloseWithError(0, "")
		return heldConn{}, fmt.Errorf("GET /v1/models: %s", resp.Status)
	}
	return h, nil
}

// streams opens Streams completions over the held connections, waits
// until each has streamed a token, reads the memory while they run, then
// cancels them all.
func (r *memoryRun) streams(ctx context.Context, idle MemoryStep) (MemoryStep, error) {
	n := r.cfg.Streams
	body := (&client{cfg: Config{Model: r.cfg.Model}}).payload(1, r.cfg.StreamTokens)
	streamCtx, stop := context.WithCancel(ctx)
	var started, failed atomic.Int64
	firstErr := make(chan error, 1)
	ready := make(chan struct{}, n)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer stop() // runs before wg.Wait: the streams end, then are waited for
	start := time.Now()
	sem := make(chan struct{}, r.cfg.Parallel)
	for i := range n {
		hc := r.conns[i%len(r.conns)]
		select {
		case sem <- struct{}{}:
		case <-streamCtx.Done():
			return MemoryStep{}, streamCtx.Err()
		}
		wg.Go(func() {
			var once sync.Once
			release := func() { once.Do(func() { <-sem }) }
			defer release()
			err := r.stream(streamCtx, hc, body, func() { release(); started.Add(1); ready <- struct{}{} })
			if err != nil && streamCtx.Err() == nil {
				failed.Add(1)
				select {
				case firstErr <- err:
				default:
				}
				stop()
			}
		})
	}
	timeout := time.NewTimer(r.cfg.StepTimeout)
	defer timeout.Stop()
	for range n {
		select {
		case <-ready:
		case err := <-firstErr:
			return MemoryStep{}, fmt.Errorf("memory: stream: %w", err)
		case <-timeout.C:
			return MemoryStep{}, fmt.Errorf("memory: %d of %d streams started within %s", started.Load(), n, r.cfg.StepTimeout)
		case <-ctx.Done():
			return MemoryStep{}, ctx.Err()
		}
	}
	step := MemoryStep{Conns: len(r.conns), Streams: n, Opened: time.Since(start)}
	rss, err := settledRSS(ctx, r.cfg.PID, r.cfg.Settle)
	if err != nil {
		return MemoryStep{}, err
	}
	// Streams that ended while the memory was read would make the figure
	// a lie: the output must outlast the reading.
	select {
	case err := <-firstErr:
		return MemoryStep{}, fmt.Errorf("memory: stream during reading: %w", err)
	default:
	}
	if f := failed.Load(); f > 0 {
		return MemoryStep{}, fmt.Errorf("memory: %d streams failed", f)
	}
	step.RSS, step.Alive, step.Retries, step.Lost = rss, r.alive(), r.retries.Load(), r.lost()
	step.ClientRSS, _ = ReadRSS(os.Getpid())
	step.PerUnit = float64(rss-idle.RSS) / float64(n)
	return step, nil
}

// errStreamEnded is a stream that finished while it should still run.
var errStreamEnded = errors.New("stream ended before the memory was read; raise mem-stream-tokens")

// stream sends one streamed completion on hc, calls onFirst at its first
// content event, and reads it until ctx ends.
func (r *memoryRun) stream(ctx context.Context, hc heldConn, body []byte, onFirst func()) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.base+completionsPath, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	if r.cfg.Bearer != "" {
		req.Header.Set("Authorization", "Bearer "+r.cfg.Bearer)
	}
	resp, err := hc.cc.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("completion: %s", resp.Status)
	}
	br := bufio.NewReader(resp.Body)
	first := true
	var last []byte
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, io.EOF) {
				return fmt.Errorf("%w (last event %.200s)", errStreamEnded, last)
			}
			return err
		}
		data, ok := bytes.CutPrefix(bytes.TrimRight(line, "\r\n"), []byte("data: "))
		if !ok {
			continue
		}
		if string(data) == "[DONE]" {
			return fmt.Errorf("%w (last event %.200s)", errStreamEnded, last)
		}
		last = append(last[:0], data...)
		if first && bytes.Contains(data, []byte(`"content"`)) {
			first = false
			onFirst()
		}
	}
}

// WriteTable prints a memory run for a terminal.
func (m *MemoryResult) WriteTable(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "memory of process %d (resident set, VmRSS)\n", m.PID)
	fmt.Fprintf(&b, "  %-40s %10s %17s %9s %10s %8s %14s\n", "step", "rss MiB", "bytes/unit", "KiB/unit", "opened", "retries", "client rss MiB")
	fmt.Fprintf(&b, "  %-40s %10.1f %17s %9s %10s %8s %14s\n", "baseline", mib(m.BaselineRSS), "-", "-", "-", "-", "-")
	for _, s := range m.Steps {
		name := fmt.Sprintf("%d idle h3 connections (%d open)", s.Conns, s.Alive)
		unit := "per conn"
		if s.Streams > 0 {
			name = fmt.Sprintf("%d active streams on %d conns", s.Streams, s.Conns)
			unit = "per stream"
		}
		fmt.Fprintf(&b, "  %-40s %10.1f %7.0f %-9s %9.1f %10s %8d %14.1f\n", name, mib(s.RSS), s.PerUnit, unit, s.PerUnit/1024, s.Opened.Round(10*time.Millisecond), s.Retries, mib(s.ClientRSS))
		for _, cause := range slices.Sorted(maps.Keys(s.Lost)) {
			fmt.Fprintf(&b, "    %d connections lost: %s\n", s.Lost[cause], cause)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }
