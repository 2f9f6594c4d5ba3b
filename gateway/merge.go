package gateway

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

// Merging tokens on a congested HTTP/3 connection.
//
// A token event is some 200 bytes of JSON around a few bytes of text. On a
// lossy link quic-go's loss-based congestion window settles below what
// many streams of such events offer (at 3% loss, 9 to 22 KB against the
// 19 KB a round trip that sixteen streams at 100 tokens/s write), and the
// connection then delivers each stream in bursts on the ACK clock, a round
// trip apart, with loss recovery on top (docs/BENCHMARKS.md, scenario 2).
// Several tokens' text in one event costs the bytes of one: while the
// connection is congestion-limited, each normal or bulk stream sends one
// event per spacing, the text of every token that arrived meanwhile, with
// the spacing chosen so that the connection's streams together offer at
// most half its window each round trip, and never longer than half a
// round trip: a lost event's gap is the spacing plus its recovery, and on
// the benchmark's link a spacing of a whole round trip gave a worse p99
// than half of one (docs/BENCHMARKS.md, scenario 2). The answer's text is
// the same; a client sees fewer, larger deltas, as it does from many
// servers.
//
// quic-go v0.65 gives the window, the smoothed RTT and the packets lost
// (quic.Conn.ConnectionStats, atomics, safe to read from any goroutine)
// but not the bytes in flight, so the demand is measured here: the token
// events the streams would write unmerged, and the bytes an event takes.
// Only a connection that lost a packet lately merges: without loss the
// window grows to what the streams offer, and the latency a merge adds
// buys nothing.

const (
	// mergeShare is the part of the congestion window the streams'
	// events may take each round trip; the rest is headroom for
	// retransmissions, ACKs and the bursts of tokens arriving together.
	mergeShare = 0.5
	// mergeLossMemory is how long after a lost packet a connection still
	// counts as lossy.
	mergeLossMemory = 5 * time.Second
	// mergeMaxSpacing bounds the spacing whatever the window: a stream
	// sends its tokens at least this often.
	mergeMaxSpacing = 100 * time.Millisecond
	// mergeMinSample is the shortest measurement of the demand.
	mergeMinSample = 10 * time.Millisecond
	// mergeMinEvent is the smallest event size the budget assumes, the
	// envelope of a one-token event.
	mergeMinEvent = 150
)

// connStatser is what mergeState reads from a connection: quic.Conn.
type connStatser interface {
	ConnectionStats() quic.ConnectionStats
}

// mergeState is one HTTP/3 connection's merging state, shared by its event
// streams. It exists once the connection's first event stream starts.
type mergeState struct {
	conn connStatser
	// Counted by the streams since the last sample: token events offered
	// (one per token with text, merged or not), and the events and bytes
	// written.
	offered, events, bytes atomic.Int64
	// streams is the event streams running.
	streams atomic.Int64
	// spacing is the time between a stream's events while merging, in
	// nanoseconds; 0 while the connection is not congestion-limited.
	spacing atomic.Int64
	// next is when the next sample is due, in nanoseconds since base:
	// monotonic, so that a step of the wall clock cannot hold sampling
	// back (and a stale spacing in force).
	next atomic.Int64
	base time.Time

	mu       sync.Mutex // guards the rest: the sampler's
	sampled  time.Time
	lost     uint64
	lostAt   time.Time
	eventAvg float64 // bytes per written event, moving average
}

func newMergeState(conn connStatser, now time.Time) *mergeState {
	m := &mergeState{conn: conn, sampled: now, eventAvg: mergeMinEvent, base: now}
	m.next.Store(int64(mergeMinSample))
	return m
}

// offer counts n tokens a stream received and, when a sample is due,
// takes one. It returns the spacing in force.
func (m *mergeState) offer(n int, now time.Time) time.Duration {
	m.offered.Add(int64(n))
	if int64(now.Sub(m.base)) >= m.next.Load() && m.mu.TryLock() {
		m.sample(now)
		m.mu.Unlock()
	}
	return time.Duration(m.spacing.Load())
}

// wrote counts an event stream's write of events events in b bytes.
func (m *mergeState) wrote(events, b int) {
	m.events.Add(int64(events))
	m.bytes.Add(int64(b))
}

// sample measures the demand since the last sample against the window and
// sets the spacing. Called with mu held.
func (m *mergeState) sample(now time.Time) {
	st := m.conn.ConnectionStats()
	rtt := st.SmoothedRTT
	elapsed := now.Sub(m.sampled)
	if elapsed < max(mergeMinSample, rtt/2) {
		m.next.Store(int64(m.sampled.Add(max(mergeMinSample, rtt/2)).Sub(m.base)))
		return
	}
	offered := m.offered.Swap(0)
	events, bytes := m.events.Swap(0), m.bytes.Swap(0)
	m.sampled = now
	m.next.Store(int64(now.Add(max(mergeMinSample, rtt/2)).Sub(m.base)))
	if events > 0 {
		m.eventAvg = 0.75*m.eventAvg + 0.25*max(mergeMinEvent, float64(bytes)/float64(events))
	}
	if st.PacketsLost > m.lost {
		m.lost, m.lostAt = st.PacketsLost, now
	}
	lossy := !m.lostAt.IsZero() && now.Sub(m.lostAt) < mergeLossMemory
	var spacing time.Duration
	if lossy {
		spacing = mergeSpacing(float64(offered)/elapsed.Seconds(), m.eventAvg, st.CongestionWindow, rtt, int(m.streams.Load()))
	}
	m.spacing.Store(int64(spacing))
}

// mergeSpacing is the time between one stream's events that keeps streams
// streams, offered demand token events a second of eventBytes each, within
// mergeShare of a window of cwnd bytes a round trip of rtt, at most half
// the round trip and mergeMaxSpacing: 0 when the demand fits unmerged.
func mergeSpacing(demand, eventBytes float64, cwnd uint64, rtt time.Duration, streams int) time.Duration {
	if rtt <= 0 || cwnd == 0 || streams < 1 || demand <= 0 {
		return 0
	}
	budget := mergeShare * float64(cwnd) / eventBytes / rtt.Seconds() // events a second
	if demand <= budget {
		return 0
	}
	spacing := time.Duration(float64(streams) / budget * float64(time.Second))
	return min(spacing, rtt/2, mergeMaxSpacing)
}
