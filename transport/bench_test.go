//go:build linux

package transport

import (
	"encoding/binary"
	"io"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkRoundTrip measures one message to a peer process and back: over
// the shared-memory rings with futex doorbells, and over a Unix stream socket
// the usual way (length-prefixed frames, one write per message, Go's
// netpoller). Besides ns/op it reports the median and 99th percentile.
func BenchmarkRoundTrip(b *testing.B) {
	b.Run("ring/64B", func(b *testing.B) { benchRingRoundTrip(b, 64) })
	b.Run("uds/64B", func(b *testing.B) { benchUDSRoundTrip(b, 64) })
}

func benchRingRoundTrip(b *testing.B, size int) {
	seg, err := NewSegment(0)
	if err != nil {
		b.Fatal(err)
	}
	defer seg.Close()
	cmd := startHelper(b, "echo", seg.File())
	defer waitHelper(b, cmd)
	defer seg.shut()

	payload := pattern(1, size)
	buf := make([]byte, 0, size)
	var lat []time.Duration
	for b.Loop() {
		start := time.Now()
		if err := seg.send(requestRing, FrameToken, 1, payload); err != nil {
			b.Fatal(err)
		}
		f, err := seg.recv(responseRing, buf)
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
		buf = f.Payload
	}
	reportLatency(b, lat)
}

func benchUDSRoundTrip(b *testing.B, size int) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	local, remote := os.NewFile(uintptr(fds[0]), "uds-local"), os.NewFile(uintptr(fds[1]), "uds-remote")
	c, err := net.FileConn(local)
	local.Close()
	if err != nil {
		remote.Close()
		b.Fatal(err)
	}
	cmd := startHelper(b, "uds-echo", remote)
	remote.Close()
	defer waitHelper(b, cmd)
	defer c.Close() // EOF ends the peer

	msg, err := AppendFrame(nil, Frame{Type: FrameToken, ID: 1, Payload: pattern(1, size)})
	if err != nil {
		b.Fatal(err)
	}
	in := make([]byte, len(msg))
	var lat []time.Duration
	for b.Loop() {
		start := time.Now()
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, in[:frameHeaderSize]); err != nil {
			b.Fatal(err)
		}
		n := int(binary.LittleEndian.Uint32(in))
		if n != size {
			b.Fatalf("echo of %d bytes, sent %d", n, size)
		}
		if _, err := io.ReadFull(c, in[frameHeaderSize:frameHeaderSize+n]); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	reportLatency(b, lat)
}

func reportLatency(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "p50-ns")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
}
