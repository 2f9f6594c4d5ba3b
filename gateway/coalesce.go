package gateway

import (
	"fmt"
	"time"

	"h3infer/config"
	"h3infer/priority"
)

// Coalescing trades a few milliseconds of token latency for far fewer
// packets: every DATA write of a token stream costs a QUIC packet, and every
// second ack-eliciting packet costs the client an ACK. Measured on loopback
// (docs/BENCHMARKS.md, "Urgency"), holding tokens for 10 ms cut packets and
// ACKs about five-fold. Urgent streams keep one write per token.

// CoalesceConfig says how long the SSE writer may hold tokens, by the
// request's class (priority.Classes). It is the configuration file's
// gateway.coalesce as it is written; zero values mean the documented
// defaults.
type CoalesceConfig struct {
	// Window applies to normal requests; urgent ones flush every token.
	// Default 10ms.
	Window config.Duration `json:"window"`
	// BulkWindow applies to bulk requests. Default 25ms.
	BulkWindow config.Duration `json:"bulk_window"`
	// MaxAckDelay bounds both windows: holding data longer than the peer
	// delays its ACKs would hold the sender's congestion window hostage
	// for nothing. quic-go v0.65 does not tell the application the peer's
	// max_ack_delay transport parameter, so this is RFC 9000's default,
	// which Chromium and quic-go clients advertise or exceed. Default 25ms.
	MaxAckDelay config.Duration `json:"max_ack_delay"`
	// MaxBuffer flushes early once this many bytes are held. Default 4096.
	MaxBuffer int `json:"max_buffer"`
	// Merge says when a normal or bulk stream may send several tokens'
	// text as one event: "congestion" (the default) while its HTTP/3
	// connection is lossy and congestion-limited (merge.go), "off" never.
	Merge string `json:"merge"`
	// Disabled flushes every token whatever the urgency (the baseline the
	// benchmark compares against), and never merges. Not a setting of the
	// file.
	Disabled bool `json:"-"`
}

// The values of CoalesceConfig.Merge.
const (
	MergeCongestion = "congestion"
	MergeOff        = "off"
)

// Defaults for CoalesceConfig's zero values.
const (
	DefaultCoalesceWindow      = 10 * time.Millisecond
	DefaultCoalesceBulkWindow  = 25 * time.Millisecond
	DefaultCoalesceMaxAckDelay = 25 * time.Millisecond
	DefaultCoalesceMaxBuffer   = 4096
)

// WithDefaults returns c with every zero value replaced by its default.
func (c CoalesceConfig) WithDefaults() CoalesceConfig {
	if c.Window == 0 {
		c.Window = config.Duration(DefaultCoalesceWindow)
	}
	if c.BulkWindow == 0 {
		c.BulkWindow = config.Duration(DefaultCoalesceBulkWindow)
	}
	if c.MaxAckDelay == 0 {
		c.MaxAckDelay = config.Duration(DefaultCoalesceMaxAckDelay)
	}
	if c.MaxBuffer == 0 {
		c.MaxBuffer = DefaultCoalesceMaxBuffer
	}
	if c.Merge == "" {
		c.Merge = MergeCongestion
	}
	return c
}

// validate reports every problem with c, defaults applied, each naming
// its key as the configuration file writes it. Config.Validate reports
// them with the rest of the gateway's.
func (c CoalesceConfig) validate() []error {
	var errs []error
	if c.MaxAckDelay < 0 {
		errs = append(errs, fmt.Errorf("gateway.coalesce.max_ack_delay: must be positive, got %s", c.MaxAckDelay))
	}
	for _, w := range []struct {
		key string
		d   config.Duration
	}{{"window", c.Window}, {"bulk_window", c.BulkWindow}} {
		if w.d < 0 || w.d > c.MaxAckDelay {
			errs = append(errs, fmt.Errorf("gateway.coalesce.%s: must be positive and at most gateway.coalesce.max_ack_delay (%s), got %s", w.key, c.MaxAckDelay, w.d))
		}
	}
	if c.Merge != MergeCongestion && c.Merge != MergeOff {
		errs = append(errs, fmt.Errorf("gateway.coalesce.merge: must be %q or %q, got %q", MergeCongestion, MergeOff, c.Merge))
	}
	if c.MaxBuffer < 1 {
		errs = append(errs, fmt.Errorf("gateway.coalesce.max_buffer: must be > 0, got %d", c.MaxBuffer))
	}
	return errs
}

// window is how long a stream of class class may hold tokens.
func (c CoalesceConfig) window(class priority.Class) time.Duration {
	switch {
	case c.Disabled || class == priority.Urgent:
		return 0
	case class == priority.Bulk:
		return time.Duration(c.BulkWindow)
	}
	return time.Duration(c.Window)
}

// coalescer holds one stream's SSE bytes until its window ends, its buffer
// fills, or something must go out at once. It is owned by the handler's
// goroutine: the handler selects on C alongside the token events, so no
// timer callback ever touches the buffer.
type coalescer struct {
	out    func([]byte) error // one DATA write, flushed to the transport
	window time.Duration
	limit  int
	buf    []byte
	timer  *time.Timer
	armed  bool
	writes int // DATA writes made
}

func newCoalescer(window time.Duration, limit int, out func([]byte) error) *coalescer {
	c := &coalescer{out: out, window: window, limit: limit}
	if window > 0 {
		c.timer = time.NewTimer(time.Hour)
		c.timer.Stop()
	}
	return c
}

// add queues b; now forces the write (first token, last bytes, errors).
func (c *coalescer) add(b []byte, now bool) error {
	c.buf = append(c.buf, b...)
	if now || c.window == 0 || len(c.buf) >= c.limit {
		return c.flush()
	}
	if !c.armed {
		c.armed = true
		c.timer.Reset(c.window)
	}
	return nil
}

// hold arms the timer for d unless it is armed: something is held outside
// the buffer (merged text, sse.go) that is due then. Only a coalescer with
// a window holds, so its timer exists.
func (c *coalescer) hold(d time.Duration) {
	if !c.armed {
		c.armed = true
		c.timer.Reset(d)
	}
}

// flush writes what is held, if anything.
func (c *coalescer) flush() error {
	if c.armed {
		c.armed = false
		c.timer.Stop()
	}
	if len(c.buf) == 0 {
		return nil
	}
	c.writes++
	err := c.out(c.buf)
	c.buf = c.buf[:0]
	return err
}

// C fires when the held bytes are due; nil (never ready) when none are held.
func (c *coalescer) C() <-chan time.Time {
	if !c.armed {
		return nil
	}
	return c.timer.C
}

// stop releases the timer.
func (c *coalescer) stop() {
	if c.timer != nil {
		c.timer.Stop()
	}
}
