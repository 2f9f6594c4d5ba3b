package gateway

import (
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// TestMergeSpacing holds the spacing to the budget's arithmetic: the
// streams' events may take half the window each round trip.
func TestMergeSpacing(t *testing.T) {
	const rtt = 50 * time.Millisecond
	for _, c := range []struct {
		name       string
		demand     float64 // token events a second
		eventBytes float64
		cwnd       uint64
		rtt        time.Duration
		streams    int
		want       time.Duration
	}{
		// Sixteen streams at 100 tokens/s against a window of 24 KB:
		// 0.5 * 24,000 / 217 / 0.05 = 1,106 events a second for the
		// connection, one per 14.5 ms for each stream.
		{"congested", 1600, 217, 24000, rtt, 16, 14_466_667},
		{"fits", 1600, 217, 60000, rtt, 16, 0},
		{"half a round trip at most", 1600, 217, 2500, rtt, 16, rtt / 2},
		{"100 ms at most", 1600, 217, 2500, 400 * time.Millisecond, 16, mergeMaxSpacing},
		{"no rtt yet", 1600, 217, 12000, 0, 16, 0},
		{"no demand", 0, 217, 12000, rtt, 16, 0},
		{"no streams", 1600, 217, 12000, rtt, 0, 0},
	} {
		got := mergeSpacing(c.demand, c.eventBytes, c.cwnd, c.rtt, c.streams)
		if d := got - c.want; d < -time.Microsecond || d > time.Microsecond {
			t.Errorf("%s: spacing %v, want %v", c.name, got, c.want)
		}
	}
}

// statsSeq is a connection's statistics as a test sets them.
type statsSeq struct{ st quic.ConnectionStats }

func (s *statsSeq) ConnectionStats() quic.ConnectionStats { return s.st }

// TestMergeStateNeedsLoss drives one connection's merging state through
// time: a congested demand merges only once the connection has lost a
// packet, and stops merging when the loss is 5 s old or the demand fits.
func TestMergeStateNeedsLoss(t *testing.T) {
	conn := &statsSeq{st: quic.ConnectionStats{SmoothedRTT: 50 * time.Millisecond, CongestionWindow: 12000}}
	t0 := time.Unix(1000, 0)
	m := newMergeState(conn, t0)
	m.streams.Store(16)
	// run offers 16 streams' tokens at 100/s each, with events of 217
	// bytes, for d from at, and returns the spacing at its end.
	run := func(at time.Time, d time.Duration) time.Duration {
		var spacing time.Duration
		for now := at; now.Before(at.Add(d)); now = now.Add(10 * time.Millisecond) {
			m.wrote(16, 16*217)
			spacing = m.offer(16, now)
		}
		return spacing
	}
	if s := run(t0, time.Second); s != 0 {
		t.Fatalf("no loss yet: spacing %v, want 0", s)
	}
	conn.st.PacketsLost = 3
	at := t0.Add(time.Second)
	if s := run(at, time.Second); s < 20*time.Millisecond || s > 25*time.Millisecond {
		t.Fatalf("lossy and congested: spacing %v, want about 29ms cut to half the 50ms round trip", s)
	}
	// The window opens: the same demand fits.
	conn.st.CongestionWindow = 64000
	if s := run(at.Add(time.Second), time.Second); s != 0 {
		t.Fatalf("the window carries the demand: spacing %v, want 0", s)
	}
	// Congested again, but the last loss is more than 5 s old.
	conn.st.CongestionWindow = 12000
	if s := run(at.Add(6*time.Second), time.Second); s != 0 {
		t.Fatalf("loss 5 s old: spacing %v, want 0", s)
	}
	conn.st.PacketsLost = 4
	if s := run(at.Add(7*time.Second), time.Second); s == 0 {
		t.Fatal("a new loss: spacing 0, want merging")
	}
}
