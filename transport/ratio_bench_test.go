//go:build linux

package transport

import (
	"slices"
	"testing"
	"time"
)

// ratioBlock is how many round trips of one kind RingOverUDS takes in a
// row before switching to the other: long enough for the ring's consumers
// to settle into their spin-or-sleep habit, short enough that the
// machine's load drifts alike over both.
const ratioBlock = 500

// BenchmarkRingOverUDS measures the ring's round trip and the Unix
// socket's in the same run, in alternating blocks, and reports each p50
// and the ring's over the socket's (issue #18's goal: at most 0.25), back
// to back and with both peers idle before each message. It also reports
// the share of this side's waits a spin ended.
func BenchmarkRingOverUDS(b *testing.B) {
	b.Run("back-to-back", func(b *testing.B) { benchRingOverUDS(b, 0) })
	b.Run("after-idle", func(b *testing.B) { benchRingOverUDS(b, idleGap) })
}

func benchRingOverUDS(b *testing.B, gap time.Duration) {
	seg := startRingPeer(b, "echo")
	conn := startUDSPeer(b, "uds-echo")
	payload := pattern(1, 64)
	buf := make([]byte, 0, 64)
	msg, err := AppendFrame(nil, Frame{Type: FrameToken, ID: 1, Payload: payload})
	if err != nil {
		b.Fatal(err)
	}
	in := make([]byte, len(msg))
	var ring, uds []time.Duration
	i := 0
	for b.Loop() {
		if gap > 0 {
			b.StopTimer()
			time.Sleep(gap)
			b.StartTimer()
		}
		start := time.Now()
		if (i/ratioBlock)%2 == 0 {
			if err := seg.send(requestRing, FrameToken, 1, payload); err != nil {
				b.Fatal(err)
			}
			f, err := seg.recv(responseRing, buf)
			if err != nil {
				b.Fatal(err)
			}
			buf = f.Payload
			ring = append(ring, time.Since(start))
		} else {
			if _, err := conn.Write(msg); err != nil {
				b.Fatal(err)
			}
			if _, err := readUDSFrame(conn, in); err != nil {
				b.Fatal(err)
			}
			uds = append(uds, time.Since(start))
		}
		i++
	}
	if len(ring) == 0 || len(uds) == 0 {
		return
	}
	slices.Sort(ring)
	slices.Sort(uds)
	r, u := ring[len(ring)/2], uds[len(uds)/2]
	b.ReportMetric(float64(r.Nanoseconds()), "ring-p50-ns")
	b.ReportMetric(float64(u.Nanoseconds()), "uds-p50-ns")
	b.ReportMetric(float64(r)/float64(u), "ring/uds")
	b.ReportMetric(float64(seg.Stats().Spins)/float64(len(ring)), "spun/op")
}
