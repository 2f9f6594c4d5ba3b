package gateway

import (
	"fmt"
	"time"

	"h3infer/priority"
)

// Coalescing trades a few milliseconds of token latency for far fewer
// packets: every DATA write of a token stream costs a QUIC packet, and every
// second ack-eliciting packet costs the client an ACK. Measured on loopback
// (docs/BENCHMARKS.md, "Urgency"), holding tokens for 10 ms cut packets and
// ACKs about five-fold. Urgent streams keep one write per token.

// CoalesceConfig says how long the SSE writer may hold tokens, by the
// request's class (priority.Classes). Zero values mean the documented
// defaults.
type CoalesceConfig struct {
	// Window applies to normal requests; urgent ones flush every token.
	// Default 10ms.
	Window time.Duration
	// BulkWindow applies to bulk requests. Default 25ms.
	BulkWindow time.Duration
	// MaxAckDelay bounds both windows: holding data longer than the peer
	// delays its ACKs would hold the sender's congestion window hostage
	// for nothing. quic-go v0.65 does not tell the application the peer's
	// max_ack_delay transport parameter, so this is RFC 9000's default,
	// which Chromium and quic-go clients advertise or exceed. Default 25ms.
	MaxAckDelay time.Duration
	// MaxBuffer flushes early once this many bytes are held. Default 4096.
	MaxBuffer int
	// Disabled flushes every token whatever the urgency (the baseline the
	// benchmark compares against).
	Disabled bool
}

// Defaults for CoalesceConfig's zero values.
const (
	DefaultCoalesceWindow      = 10 * time.Millisecond
	DefaultCoalesceBulkWindow  = 25 * time.Millisecond
	DefaultCoalesceMaxAckDelay = 25 * time.Millisecond
	DefaultCoalesceMaxBuffer   = 4096
)

// withDefaults validates c and fills its zero values; keys are named as in
// the config file.
func (c CoalesceConfig) withDefaults() (CoalesceConfig, []error) {
	var errs []error
	if c.Window < 0 || c.BulkWindow < 0 || c.MaxAckDelay < 0 || c.MaxBuffer < 0 {
		errs = append(errs, fmt.Errorf("gateway.coalesce: durations and max_buffer must be >= 0"))
	}
	if c.Window == 0 {
		c.Window = DefaultCoalesceWindow
	}
	if c.BulkWindow == 0 {
		c.BulkWindow = DefaultCoalesceBulkWindow
	}
	if c.MaxAckDelay == 0 {
		c.MaxAckDelay = DefaultCoalesceMaxAckDelay
	}
	if c.MaxBuffer == 0 {
		c.MaxBuffer = DefaultCoalesceMaxBuffer
	}
	if c.Window > c.MaxAckDelay {
		errs = append(errs, fmt.Errorf("gateway.coalesce.window: must be at most max_ack_delay (%s), got %s", c.MaxAckDelay, c.Window))
	}
	if c.BulkWindow > c.MaxAckDelay {
		errs = append(errs, fmt.Errorf("gateway.coalesce.bulk_window: must be at most max_ack_delay (%s), got %s", c.MaxAckDelay, c.BulkWindow))
	}
	return c, errs
}

// window is how long a stream of class class may hold tokens.
func (c CoalesceConfig) window(class priority.Class) time.Duration {
	switch {
	case c.Disabled || class == priority.Urgent:
		return 0
	case class == priority.Bulk:
		return c.BulkWindow
	}
	return c.Window
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
