package gateway

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"h3infer/priority"
)

// The SSE writer: how a streamed completion's bytes reach the client,
// coalesced by the request's class, over HTTP/3 with the request's QUIC
// priority and over TCP.

// sseWriter writes one response's server-sent events. Write queues an
// event, which goes out when the stream's coalescing window ends
// (coalesce.go); Flush sends what is queued now. The stream ends with
// Close once its last event is written, or with Abort when it is cut
// short. An sseWriter is owned by the handler's goroutine: whoever waits
// for the next token selects on due and calls Flush when it fires.
type sseWriter struct {
	w    http.ResponseWriter
	prio priority.Signal
	held *coalescer // its out is send
	// While its connection is congested (merge.go), the text of tokens
	// waiting to go out as one event, rendered by encode; merge is nil
	// for a stream that never merges (TCP, urgent, coalescing off).
	merge  *mergeState
	encode func(text string) []byte
	text   []byte
	merged prometheus.Counter // tokens whose text joined held text
	// Set by open, on the first write:
	opened bool
	str    *http3.Stream            // over HTTP/3, taken over from w
	rc     *http.ResponseController // over TCP
	// cut is set by the first write that fails: the client went away or
	// stopped reading.
	cut bool
	// For the log line and span event a failed write leaves.
	log       *slog.Logger
	requestID uint64
	span      trace.Span
}

// newSSEWriter commits the response header of an event stream whose
// request the scheduler put in class, which sets the coalescing window
// (coalesce.go). The header goes out with the first bytes of the body, not
// ahead of them: taking over the HTTP/3 stream flushes the header, and done
// apart from the first write it went in a packet of its own, which the
// client had to take before the first token.
func (g *Gateway) newSSEWriter(ctx context.Context, w http.ResponseWriter, prio priority.Signal, class priority.Class, requestID uint64) *sseWriter {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	sw := &sseWriter{w: w, prio: prio, log: g.log, requestID: requestID, span: trace.SpanFromContext(ctx)}
	sw.held = newCoalescer(g.cfg.Coalesce.window(class), g.cfg.Coalesce.MaxBuffer, sw.send)
	return sw
}

// mergeTokens lets the stream merge its tokens' text, each rendered as an
// event by encode, while its HTTP/3 connection is congested (merge.go). A
// stream over TCP, an urgent one, or one whose coalescing is off or
// merging disabled, keeps one event per token.
func (g *Gateway) mergeTokens(ctx context.Context, sw *sseWriter, class priority.Class, encode func(string) []byte) {
	sw.encode = encode
	c := g.cfg.Coalesce
	if c.Disabled || c.Merge == MergeOff || class == priority.Urgent {
		return
	}
	conn := quicConn(ctx)
	gate, ok := ctx.Value(connGateKey{}).(*connGate)
	if conn == nil || !ok {
		return
	}
	sw.merge, sw.merged = gate.merging(conn), g.metrics.merged
	sw.merge.streams.Add(1)
}

// WriteText queues the event of one token's text, which arrived at now.
// While the connection is congested the text waits, with any that
// follows, to go out as one event when the merge spacing ends; the
// stream's first token never waits.
func (sw *sseWriter) WriteText(text string, now time.Time) error {
	if sw.merge == nil {
		return sw.Write(sw.encode(text))
	}
	spacing := sw.merge.offer(1, now)
	if spacing == 0 || sw.held.writes == 0 {
		ev := sw.encode(text)
		sw.merge.wrote(1, len(ev))
		return sw.Write(ev)
	}
	if len(sw.text) > 0 {
		sw.merged.Inc()
	}
	sw.text = append(sw.text, text...)
	// Never sooner than the class's own window: a bulk stream's 25 ms
	// would otherwise become a shorter spacing's more writes.
	sw.held.hold(max(spacing, sw.held.window))
	if len(sw.text) >= sw.held.limit {
		return sw.Flush()
	}
	return nil
}

// spill queues the held text as one event.
func (sw *sseWriter) spill() error {
	if len(sw.text) == 0 {
		return nil
	}
	ev := sw.encode(string(sw.text))
	sw.text = sw.text[:0]
	if sw.merge != nil {
		sw.merge.wrote(1, len(ev))
	}
	return sw.held.add(ev, false)
}

// Write queues one event. An urgent stream, or one whose buffer is full,
// writes at once.
func (sw *sseWriter) Write(event []byte) error {
	if len(event) == 0 {
		return nil
	}
	if err := sw.spill(); err != nil {
		return err
	}
	return sw.held.add(event, false)
}

// Flush writes what is queued, if anything.
func (sw *sseWriter) Flush() error {
	if err := sw.spill(); err != nil {
		return err
	}
	return sw.held.flush()
}

// due fires when the queued bytes are due; nil while none are queued.
func (sw *sseWriter) due() <-chan time.Time { return sw.held.C() }

// writes is how many writes reached the transport (or failed there).
func (sw *sseWriter) writes() int { return sw.held.writes }

// Close writes what is queued and ends the stream cleanly. If that write
// fails, the stream ends as Abort ends it.
func (sw *sseWriter) Close() error {
	err := sw.Flush()
	sw.end(err == nil)
	return err
}

// Abort ends the stream short. Over HTTP/3 its sending side is reset
// (H3_REQUEST_CANCELLED), so the client sees the answer cut off rather
// than ended; over TCP the response ends when the handler returns.
func (sw *sseWriter) Abort() { sw.end(false) }

// end releases the coalescer's timer and ends the HTTP/3 stream, if it was
// taken over.
func (sw *sseWriter) end(clean bool) {
	sw.held.stop()
	if sw.merge != nil {
		sw.merge.streams.Add(-1)
		sw.merge = nil
	}
	switch {
	case sw.str == nil:
	case clean:
		sw.str.Close()
	default:
		sw.str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
	}
}

// send is the coalescer's output: one write, flushed to the transport.
// Only cut remembers a failure: the next write tries again, and opens
// again if open failed.
func (sw *sseWriter) send(b []byte) error {
	if !sw.opened {
		if err := sw.open(); err != nil {
			sw.cut = true
			sw.log.Warn("stream: take over the HTTP/3 stream", "request_id", sw.requestID, "err", err)
			return err
		}
	}
	err := sw.write(b)
	if err != nil && !sw.cut {
		// The handler's deferred Close of the dispatch cancels the
		// worker's sequence.
		sw.cut = true
		sw.span.AddEvent("cancelled",
			trace.WithAttributes(attribute.String("reason", "writing to the client failed: "+err.Error())))
	}
	return err
}

// open readies the transport. Over HTTP/3 it takes the stream over from
// http3's response writer (which sends the header) to set the stream's
// QUIC priority, which the ResponseWriter API has no way to do; quic-go
// keeps applying the client's PRIORITY_UPDATE frames to the stream
// afterwards.
func (sw *sseWriter) open() error {
	for rw := sw.w; rw != nil; {
		if hs, ok := rw.(http3.HTTPStreamer); ok {
			str, err := hs.HTTPStream()
			if err != nil {
				return err
			}
			// Always incremental, whatever the client said. quic-go
			// sends non-incremental streams of one urgency one after
			// the other, each to its end: right for a file the client
			// cannot use until it is whole, wrong for tokens produced at
			// the model's pace however fast the link. With RFC 9218's
			// default i=?0 a new stream's first token waited for every
			// older stream to finish, and on a lossy link, where the
			// congestion window is below what the streams offer, the
			// lower stream IDs took the whole window while the others
			// stalled for most of a second (docs/BENCHMARKS.md, scenario
			// 2: four streams sent nothing for 888 ms while twelve
			// shared the window). A client that says i=?0 about an event
			// stream is taking a default, not asking for stalls; RFC 9218
			// lets a server weigh what it knows of the response. A later
			// PRIORITY_UPDATE still reaches the stream (quic-go applies
			// it unseen), and re-orders only that client's connection.
			str.SetPriority(int8(sw.prio.Urgency), true)
			sw.str, sw.opened = str, true
			return nil
		}
		u, ok := rw.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			break
		}
		rw = u.Unwrap()
	}
	sw.rc, sw.opened = http.NewResponseController(sw.w), true
	return nil
}

// write sends b: over HTTP/3 as one DATA frame, over TCP written and
// flushed.
func (sw *sseWriter) write(b []byte) error {
	if sw.str != nil {
		_, err := sw.str.Write(b)
		return err
	}
	if _, err := sw.w.Write(b); err != nil {
		return err
	}
	return sw.rc.Flush()
}
