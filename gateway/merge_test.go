package gateway

import (
	"fmt"
	"testing"
	"time"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
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

// TestMergeKeepsClassWindow: merging never sends a stream's held text
// sooner than its class's own window would. A bulk stream (25 ms window)
// on a connection whose spacing is 5 ms once armed its timer for 5 ms,
// which made a congested connection's streams write more often than
// coalescing alone. A timer never fires early, so the check cannot fail
// on a slow machine.
func TestMergeKeepsClassWindow(t *testing.T) {
	var writes []string
	sw := &sseWriter{encode: func(s string) []byte { return []byte("data: " + s + "\n\n") }}
	sw.held = newCoalescer(DefaultCoalesceBulkWindow, DefaultCoalesceMaxBuffer, func(b []byte) error {
		writes = append(writes, string(b))
		return nil
	})
	now := time.Now()
	m := newMergeState(&statsSeq{}, now)
	m.spacing.Store(int64(5 * time.Millisecond))
	m.next.Store(int64(time.Hour)) // no sample: the spacing stays
	sw.merge, sw.merged = m, prometheus.NewCounter(prometheus.CounterOpts{Name: "merged"})

	// The first token goes at once, as relay flushes it.
	if err := sw.WriteText("a", now); err != nil || sw.Flush() != nil {
		t.Fatal(err)
	}
	if err := sw.WriteText("b", now); err != nil {
		t.Fatal(err)
	}
	if err := sw.WriteText("c", now); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	select {
	case <-sw.due():
		t.Fatalf("held text due after %v, before the bulk window of %v", time.Since(start), DefaultCoalesceBulkWindow)
	case <-time.After(DefaultCoalesceBulkWindow / 2):
	}
	<-sw.due()
	if err := sw.Flush(); err != nil {
		t.Fatal(err)
	}
	if want := []string{"data: a\n\n", "data: bc\n\n"}; fmt.Sprint(writes) != fmt.Sprint(want) {
		t.Errorf("writes %q, want %q", writes, want)
	}
}

// TestMergeSamplesAcrossWallClockStep: the sampling schedule runs on the
// monotonic clock. With it kept in wall-clock nanoseconds, a step of the
// wall clock back by an hour stopped sampling for that hour, and a
// connection that had been congested kept merging with its window open
// and its loss long past.
func TestMergeSamplesAcrossWallClockStep(t *testing.T) {
	conn := &statsSeq{st: quic.ConnectionStats{SmoothedRTT: 50 * time.Millisecond, CongestionWindow: 12000, PacketsLost: 3}}
	base := time.Now() // with a monotonic reading
	m := newMergeState(conn, base)
	m.streams.Store(16)
	run := func(at time.Time, d, wallStep time.Duration) time.Duration {
		var spacing time.Duration
		for now := at; now.Before(at.Add(d)); now = now.Add(10 * time.Millisecond) {
			m.wrote(16, 16*217)
			spacing = m.offer(16, stepWall(now, wallStep))
		}
		return spacing
	}
	if s := run(base.Add(100*time.Millisecond), time.Second, 0); s == 0 {
		t.Fatal("lossy and congested: spacing 0, want merging")
	}
	conn.st.CongestionWindow = 1 << 20 // the window opens; the loss ages past 5 s
	if s := run(base.Add(2*time.Second), 10*time.Second, -time.Hour); s != 0 {
		t.Errorf("10 s on, the wall clock an hour back, the window open and the loss 10 s old: spacing %v, want 0", s)
	}
}

// stepWall returns t with its wall-clock reading moved by d (whole
// seconds) and its monotonic reading kept, as after an NTP step. It
// relies on time.Time's layout with a monotonic reading: the wall
// seconds since 1885 in bits 30..62 of its first word.
func stepWall(t time.Time, d time.Duration) time.Time {
	type timeLayout struct {
		wall uint64
		ext  int64
		loc  *time.Location
	}
	p := (*timeLayout)(unsafe.Pointer(&t))
	if p.wall&(1<<63) == 0 {
		panic("stepWall: no monotonic reading")
	}
	p.wall = uint64(int64(p.wall) + int64(d/time.Second)<<30)
	return t
}
