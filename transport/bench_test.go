//go:build linux

package transport

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"h3infer/infer"

	"golang.org/x/sys/unix"
)

// The benchmarks compare the shared-memory rings (futex doorbells, checked
// frames) with a Unix stream socket used the usual way: the same frames,
// length-prefixed, through Go's netpoller. Both run against a second process
// (this test binary re-executed, see TestHelperProcess), so every message
// really crosses between processes and, on a busy machine, between cores.
// docs/BENCHMARKS.md has the command and the figures.

const (
	streamMessages = 100 // messages answering one request in Stream100
	streamPayload  = 16  // bytes per streamed message: about one token
)

var sizes = []struct {
	name string
	n    int
}{{"64B", 64}, {"4KiB", 4 << 10}}

// BenchmarkRoundTrip measures one message to the peer and its echo back.
func BenchmarkRoundTrip(b *testing.B) {
	for _, sz := range sizes {
		b.Run("ring/"+sz.name, func(b *testing.B) { benchRingRoundTrip(b, sz.n, 0) })
		b.Run("uds/"+sz.name, func(b *testing.B) { benchUDSRoundTrip(b, sz.n, 0) })
	}
}

// idleGap is the pause before each message in RoundTripAfterIdle: long
// enough for both processes to go to sleep and their CPUs to go idle, as
// between the requests of a lone client.
const idleGap = 500 * time.Microsecond

// BenchmarkRoundTripAfterIdle is RoundTrip with both sides idle before
// each message, so that every message wakes a sleeping peer, the way the
// submit and the first token of a request at concurrency 1 do. The pause
// itself is not timed.
func BenchmarkRoundTripAfterIdle(b *testing.B) {
	b.Run("ring/64B", func(b *testing.B) { benchRingRoundTrip(b, 64, idleGap) })
	b.Run("uds/64B", func(b *testing.B) { benchUDSRoundTrip(b, 64, idleGap) })
}

// BenchmarkStream100 measures one request answered by 100 small messages,
// as a token stream is, until the last one has arrived.
func BenchmarkStream100(b *testing.B) {
	b.Run("ring", benchRingStream)
	b.Run("uds", benchUDSStream)
}

// BenchmarkThroughput measures one-way messages as fast as the peer takes
// them. The socket's writer and reader are buffered (bufio), the fair
// baseline for bulk transfer: one write per message would be far slower.
// The ring's sender batches the same way, publishing throughputBatch
// frames at a time (sendBatch); ring-unbatched publishes every frame on its
// own (send), as a lone SendToken does.
func BenchmarkThroughput(b *testing.B) {
	for _, sz := range sizes {
		b.Run("ring/"+sz.name, func(b *testing.B) { benchRingThroughput(b, sz.n, throughputBatch) })
		b.Run("ring-unbatched/"+sz.name, func(b *testing.B) { benchRingThroughput(b, sz.n, 1) })
		b.Run("uds/"+sz.name, func(b *testing.B) { benchUDSThroughput(b, sz.n) })
	}
}

// startRingPeer creates a segment and starts the peer in mode on it. The
// cleanup closes the ring, which ends the peer, and reaps it.
func startRingPeer(b *testing.B, mode string) *Segment {
	b.Helper()
	seg, err := NewSegment(0)
	if err != nil {
		b.Fatal(err)
	}
	cmd := startHelper(b, mode, seg.File())
	b.Cleanup(func() {
		seg.shut()
		waitHelper(b, cmd)
		seg.Close()
	})
	return seg
}

// startUDSPeer connects a socket pair and starts the peer in mode on the far
// end. The cleanup closes the socket (EOF ends the peer) and reaps it.
func startUDSPeer(b *testing.B, mode string) net.Conn {
	b.Helper()
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
	cmd := startHelper(b, mode, remote)
	remote.Close()
	b.Cleanup(func() {
		c.Close()
		waitHelper(b, cmd)
	})
	return c
}

func benchRingRoundTrip(b *testing.B, size int, gap time.Duration) {
	seg := startRingPeer(b, "echo")
	payload := pattern(1, size)
	buf := make([]byte, 0, size)
	var lat []time.Duration
	for b.Loop() {
		if gap > 0 {
			b.StopTimer()
			time.Sleep(gap)
			b.StartTimer()
		}
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
	reportSpins(b, seg)
}

func benchUDSRoundTrip(b *testing.B, size int, gap time.Duration) {
	c := startUDSPeer(b, "uds-echo")
	msg, err := AppendFrame(nil, Frame{Type: FrameToken, ID: 1, Payload: pattern(1, size)})
	if err != nil {
		b.Fatal(err)
	}
	in := make([]byte, len(msg))
	var lat []time.Duration
	for b.Loop() {
		if gap > 0 {
			b.StopTimer()
			time.Sleep(gap)
			b.StartTimer()
		}
		start := time.Now()
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := readUDSFrame(c, in); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	reportLatency(b, lat)
}

// readUDSFrame reads one length-prefixed frame into buf and checks it as
// the ring's consumer does.
func readUDSFrame(r io.Reader, buf []byte) (Frame, error) {
	if _, err := io.ReadFull(r, buf[:frameHeaderSize]); err != nil {
		return Frame{}, err
	}
	n := int(binary.LittleEndian.Uint32(buf))
	if n > len(buf)-frameHeaderSize {
		return Frame{}, fmt.Errorf("frame of %d bytes", n)
	}
	if _, err := io.ReadFull(r, buf[frameHeaderSize:frameHeaderSize+n]); err != nil {
		return Frame{}, err
	}
	f, _, err := DecodeFrame(buf[:frameHeaderSize+n])
	return f, err
}

func benchRingStream(b *testing.B) {
	seg := startRingPeer(b, "stream")
	buf := make([]byte, 0, 64)
	var lat []time.Duration
	for b.Loop() {
		start := time.Now()
		if err := seg.send(requestRing, FrameSubmit, 1, nil); err != nil {
			b.Fatal(err)
		}
		for range streamMessages {
			f, err := seg.recv(responseRing, buf)
			if err != nil {
				b.Fatal(err)
			}
			buf = f.Payload
		}
		lat = append(lat, time.Since(start))
	}
	reportLatency(b, lat)
}

func benchUDSStream(b *testing.B) {
	c := startUDSPeer(b, "uds-stream")
	msg, err := AppendFrame(nil, Frame{Type: FrameSubmit, ID: 1})
	if err != nil {
		b.Fatal(err)
	}
	in := make([]byte, 256)
	var lat []time.Duration
	for b.Loop() {
		start := time.Now()
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		for range streamMessages {
			if _, err := readUDSFrame(c, in); err != nil {
				b.Fatal(err)
			}
		}
		lat = append(lat, time.Since(start))
	}
	reportLatency(b, lat)
}

// throughputBatch is how many frames the ring's bulk sender publishes at
// once: as many 64-byte frames (88 bytes on the socket) as bufio's 64 KiB
// buffer hands the kernel per write, so both sides batch alike.
const throughputBatch = (64 << 10) / (frameHeaderSize + 64)

func benchRingThroughput(b *testing.B, size, batch int) {
	seg := startRingPeer(b, "sink")
	payload := pattern(1, size)
	frames := make([]Frame, 0, batch)
	b.SetBytes(int64(size))
	start := time.Now()
	for b.Loop() {
		frames = append(frames, Frame{Type: FrameToken, ID: 1, Payload: payload})
		if len(frames) == batch {
			if err := seg.sendBatch(requestRing, frames); err != nil {
				b.Fatal(err)
			}
			frames = frames[:0]
		}
	}
	if err := seg.sendBatch(requestRing, frames); err != nil {
		b.Fatal(err)
	}
	// The peer acknowledges the end marker once it has read everything.
	if err := seg.send(requestRing, FrameDone, 1, nil); err != nil {
		b.Fatal(err)
	}
	if _, err := seg.recv(responseRing, nil); err != nil {
		b.Fatal(err)
	}
	reportRate(b, time.Since(start))
}

func benchUDSThroughput(b *testing.B, size int) {
	c := startUDSPeer(b, "uds-sink")
	msg, err := AppendFrame(nil, Frame{Type: FrameToken, ID: 1, Payload: pattern(1, size)})
	if err != nil {
		b.Fatal(err)
	}
	end, _ := AppendFrame(nil, Frame{Type: FrameDone, ID: 1})
	w := bufio.NewWriterSize(c, 64<<10)
	b.SetBytes(int64(size))
	start := time.Now()
	for b.Loop() {
		if _, err := w.Write(msg); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := w.Write(end); err != nil {
		b.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	if _, err := readUDSFrame(c, make([]byte, 64)); err != nil {
		b.Fatal(err)
	}
	reportRate(b, time.Since(start))
}

func reportLatency(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "p50-ns")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
}

// reportSpins reports the share of this process's waits for data that a
// spin ended (spin.go) rather than a sleep.
func reportSpins(b *testing.B, seg *Segment) {
	if b.N > 0 {
		b.ReportMetric(float64(seg.Stats().Spins)/float64(b.N), "spun/op")
	}
}

func reportRate(b *testing.B, d time.Duration) {
	if b.N > 0 && d > 0 {
		b.ReportMetric(float64(b.N)/d.Seconds(), "msg/s")
	}
}

// ringStream answers every request frame with streamMessages small frames.
func ringStream(seg *Segment) error {
	payload := pattern(2, streamPayload)
	for {
		f, err := seg.recv(requestRing, nil)
		if err != nil {
			return closedIsEnd(err)
		}
		for range streamMessages {
			if err := seg.send(responseRing, FrameToken, f.ID, payload); err != nil {
				return closedIsEnd(err)
			}
		}
	}
}

// ringSink reads frames until a FrameDone, which it acknowledges. It takes
// what is there in batches, as the buffered socket reader does.
func ringSink(seg *Segment) error {
	buf := make([]byte, 0, 64<<10)
	frames := make([]Frame, 0, 1024)
	for {
		fs, err := seg.recvBatch(requestRing, frames[:0], buf)
		if err != nil {
			return closedIsEnd(err)
		}
		for _, f := range fs {
			if f.Type == FrameDone {
				if err := seg.send(responseRing, FrameDone, f.ID, nil); err != nil {
					return closedIsEnd(err)
				}
			}
		}
	}
}

func closedIsEnd(err error) error {
	if errors.Is(err, ErrClosed) {
		return nil
	}
	return err
}

// udsStream is ringStream on a socket: each answer is written on its own,
// as a server writes tokens as they come.
func udsStream(c net.Conn) error {
	in := make([]byte, 256)
	msg, err := AppendFrame(nil, Frame{Type: FrameToken, ID: 1, Payload: pattern(2, streamPayload)})
	if err != nil {
		return err
	}
	for {
		if _, err := readUDSFrame(c, in); err != nil {
			return eofIsEnd(err)
		}
		for range streamMessages {
			if _, err := c.Write(msg); err != nil {
				return err
			}
		}
	}
}

// udsSink is ringSink on a socket, reading through a buffer.
func udsSink(c net.Conn) error {
	r := bufio.NewReaderSize(c, 64<<10)
	in := make([]byte, 8<<10)
	ack, _ := AppendFrame(nil, Frame{Type: FrameDone, ID: 1})
	for {
		f, err := readUDSFrame(r, in)
		if err != nil {
			return eofIsEnd(err)
		}
		if f.Type == FrameDone {
			if _, err := c.Write(ack); err != nil {
				return err
			}
		}
	}
}

func eofIsEnd(err error) error {
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// BenchmarkGatewayToken measures what the gateway pays per streamed token
// on the real endpoints: the worker process encodes a token frame and
// rings the doorbell (WorkerEnd.SendToken), the gateway's receive loop
// decodes and checks it and routes it to its Call, and the request's own
// goroutine takes it off the Call's channel. One op is one token; the
// worker streams b.N of them for one request.
func BenchmarkGatewayToken(b *testing.B) {
	g := startTokenGateway(b, GatewayEndConfig{CallBuffer: 1 << 20})
	n := b.N
	b.ResetTimer()
	c, err := g.Open(1, &infer.Request{Prompt: strconv.Itoa(n)})
	if err != nil {
		b.Fatal(err)
	}
	got := 0
	for ev := range c.Events() {
		if ev.Err != nil {
			b.Fatalf("error event %+v", ev.Err)
		}
		if ev.Done != nil {
			break
		}
		got++
	}
	b.StopTimer()
	if got != n {
		b.Fatalf("got %d tokens, want %d", got, n)
	}
}

// tokenWorker answers a submit whose prompt is a number N with N token
// frames and a done frame, through the real WorkerEnd.
func tokenWorker(seg *Segment) error {
	w := NewWorkerEnd(seg)
	for {
		f, err := w.Recv()
		if err != nil {
			return closedIsEnd(err)
		}
		if f.Type != FrameSubmit {
			continue
		}
		s, err := DecodeSubmit(f.Payload)
		if err != nil {
			return err
		}
		n, err := strconv.Atoi(s.Prompt)
		if err != nil {
			return err
		}
		tok := infer.Token{Count: 1, Text: " token"}
		for range n {
			if err := w.SendToken(f.ID, tok); err != nil {
				return closedIsEnd(err)
			}
		}
		if err := w.SendDone(f.ID, infer.Done{FinishReason: infer.FinishLength, CompletionTokens: uint32(n)}); err != nil {
			return closedIsEnd(err)
		}
	}
}
