//go:build linux

package transport

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// checkGoroutines fails the test if it ends with more goroutines than it
// started with. Register it first so its cleanup runs last.
func checkGoroutines(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			buf := make([]byte, 1<<16)
			buf = buf[:runtime.Stack(buf, true)]
			t.Errorf("%d goroutines leaked:\n%s", n-before, buf)
		}
	})
}

// newPair maps one segment twice in this process, as the gateway and the
// worker would map it in two: each side has its own mapping and cursors.
func newPair(t *testing.T, ringSize int) (gw, wk *Segment) {
	t.Helper()
	gw, err := NewSegment(ringSize)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Dup(int(gw.File().Fd()))
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "peer")
	wk, err = OpenSegment(f)
	if err != nil {
		f.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := wk.Close(); err != nil {
			t.Errorf("close worker segment: %v", err)
		}
		if err := gw.Close(); err != nil {
			t.Errorf("close gateway segment: %v", err)
		}
	})
	return gw, wk
}

// pattern fills a payload whose every byte depends on the frame and the
// position, so a misplaced or torn copy shows.
func pattern(id uint64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(id*131 + uint64(i)*7 + uint64(i>>8))
	}
	return b
}

// waitWord polls a shared futex word until it holds want: the proof that
// the other goroutine has gone to sleep on it.
func waitWord(t *testing.T, what string, get func() uint32, want uint32) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for get() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s never became %d", what, want)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestNewSegmentSizes(t *testing.T) {
	for _, n := range []int{-1, 1, MinRingSize - 1, MinRingSize + 16, MaxRingSize * 2} {
		if s, err := NewSegment(n); err == nil {
			s.Close()
			t.Errorf("NewSegment(%d) succeeded, want an error", n)
		}
	}
	s, err := NewSegment(0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.RingSize() != DefaultRingSize {
		t.Errorf("got ring size %d, want %d", s.RingSize(), DefaultRingSize)
	}
}

func TestOpenSegmentRejects(t *testing.T) {
	good := func(t *testing.T, corrupt func(mem []byte)) *os.File {
		s, err := NewSegment(MinRingSize)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		corrupt(s.mem)
		fd, err := unix.Dup(int(s.File().Fd()))
		if err != nil {
			t.Fatal(err)
		}
		return os.NewFile(uintptr(fd), "copy")
	}
	tests := map[string]struct {
		file func(t *testing.T) *os.File
		want string
	}{
		"magic":     {func(t *testing.T) *os.File { return good(t, func(m []byte) { m[0] ^= 1 }) }, "magic"},
		"version":   {func(t *testing.T) *os.File { return good(t, func(m []byte) { m[offVersion] = 9 }) }, "version"},
		"ring size": {func(t *testing.T) *os.File { return good(t, func(m []byte) { m[offRingSize] = 3 }) }, "ring size"},
		"size mismatch": {func(t *testing.T) *os.File {
			return good(t, func(m []byte) { m[offRingSize+1] = 0x20 }) // says 8 KiB rings, file holds 4 KiB ones
		}, "header says"},
		"unsealed": {func(t *testing.T) *os.File {
			fd, err := unix.MemfdCreate("unsealed", unix.MFD_CLOEXEC)
			if err != nil {
				t.Fatal(err)
			}
			if err := unix.Ftruncate(fd, headerSize+2*MinRingSize); err != nil {
				t.Fatal(err)
			}
			return os.NewFile(uintptr(fd), "unsealed")
		}, "sealed"},
		"short": {func(t *testing.T) *os.File {
			fd, err := unix.MemfdCreate("short", unix.MFD_CLOEXEC)
			if err != nil {
				t.Fatal(err)
			}
			return os.NewFile(uintptr(fd), "short")
		}, "shorter"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			f := tt.file(t)
			defer f.Close()
			s, err := OpenSegment(f)
			if err == nil {
				s.Close()
				t.Fatal("OpenSegment succeeded, want an error")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %v, want an error about %q", err, tt.want)
			}
		})
	}
}

func TestRingWraparound(t *testing.T) {
	checkGoroutines(t)
	gw, wk := newPair(t, MinRingSize)
	// 1500-byte payloads make 1520-byte records, which leave a gap at the
	// end of a 4 KiB ring every third frame and so exercise the skip marker.
	var buf []byte
	for i := range uint64(200) {
		want := pattern(i, 1500)
		if err := gw.send(requestRing, FrameSubmit, i, want); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		f, err := wk.recv(requestRing, buf)
		if err != nil {
			t.Fatalf("recv %d: %v", i, err)
		}
		if f.Type != FrameSubmit || f.ID != i || !bytes.Equal(f.Payload, want) {
			t.Fatalf("frame %d: got type %v id %d, payload equal %v", i, f.Type, f.ID, bytes.Equal(f.Payload, want))
		}
		buf = f.Payload
	}
	if wraps := gw.rings[requestRing].tail.Load() / MinRingSize; wraps < 50 {
		t.Errorf("ring wrapped %d times, want at least 50", wraps)
	}
}

func TestRingFrameSizes(t *testing.T) {
	checkGoroutines(t)
	gw, wk := newPair(t, MinRingSize)
	max := gw.MaxPayload()
	sizes := []int{0, 1, 15, 16, 17, 100, 1000, max / 2, max - 33, max - 17, max - 16, max - 1, max, 3, max, max, 0, max}
	var wg sync.WaitGroup
	defer wg.Wait()
	sendErr := make(chan error, 1)
	wg.Go(func() {
		for i, n := range sizes {
			if err := gw.send(requestRing, FrameToken, uint64(i), pattern(uint64(i), n)); err != nil {
				sendErr <- fmt.Errorf("send %d bytes: %w", n, err)
				return
			}
		}
		sendErr <- nil
	})
	var buf []byte
	for i, n := range sizes {
		f, err := wk.recv(requestRing, buf)
		if err != nil {
			t.Fatalf("recv %d bytes: %v", n, err)
		}
		if f.ID != uint64(i) || !bytes.Equal(f.Payload, pattern(uint64(i), n)) {
			t.Fatalf("frame %d: got id %d, %d bytes, want %d bytes", i, f.ID, len(f.Payload), n)
		}
		buf = f.Payload
	}
	if err := <-sendErr; err != nil {
		t.Fatal(err)
	}
}

// TestRingNoLostWakeup puts a producer and a consumer through thousands of
// rounds in which each goes to sleep just as the other is about to ring for
// it, and fails if both stay asleep. Each round starts both sides together,
// staggers them by a random busy wait, then has the producer send two
// records that each fill the ring while the consumer reads them: the
// consumer sleeps until the first is published (the data doorbell), and the
// producer sleeps until the first is read before it writes the second (the
// space doorbell). Across the rounds the stagger brings each side's store
// and load of the handshake within nanoseconds of the other's. Were a load
// able to pass its own side's store, both sides could miss each other: a
// consumer asleep on a published record, or a producer asleep on a drained
// ring. Under the race detector a Store on the mapping was such a store
// (see ring's "Memory ordering"), and this test stalled within a few
// hundred rounds.
func TestRingNoLostWakeup(t *testing.T) {
	checkGoroutines(t)
	gw, wk := newPair(t, MinRingSize)
	const (
		rounds     = 5000
		maxStagger = 15 * time.Microsecond
		stall      = 10 * time.Second
	)
	payload := pattern(1, gw.MaxPayload())
	var (
		wg      sync.WaitGroup
		arrived [2]atomic.Int64 // the round each side has reached
		stop    atomic.Bool
	)
	// start spins until the other side has reached round k too; a spin, not
	// a channel, so that both are running when the round begins.
	start := func(me int, k int64, rng *rand.Rand) bool {
		arrived[me].Store(k)
		for i := 0; arrived[1-me].Load() < k; i++ {
			if stop.Load() {
				return false
			}
			if i%64 == 63 {
				runtime.Gosched()
			}
		}
		d := time.Duration(rng.Int64N(int64(maxStagger)))
		for t0 := time.Now(); time.Since(t0) < d; {
		}
		return true
	}
	errs := make(chan error, 2)
	wg.Go(func() {
		rng := rand.New(rand.NewPCG(1, 2))
		for k := range int64(rounds) {
			if !start(0, k+1, rng) {
				errs <- nil
				return
			}
			for j := range uint64(2) {
				if err := gw.send(requestRing, FrameToken, uint64(k)*2+j, payload); err != nil {
					errs <- fmt.Errorf("round %d: send: %w", k, err)
					return
				}
			}
		}
		errs <- nil
	})
	wg.Go(func() {
		rng := rand.New(rand.NewPCG(3, 4))
		var buf []byte
		for k := range int64(rounds) {
			if !start(1, k+1, rng) {
				errs <- nil
				return
			}
			for j := range uint64(2) {
				f, err := wk.recv(requestRing, buf)
				if err != nil {
					errs <- fmt.Errorf("round %d: recv: %w", k, err)
					return
				}
				if want := uint64(k)*2 + j; f.ID != want || len(f.Payload) != len(payload) {
					errs <- fmt.Errorf("round %d: got id %d with %d bytes, want id %d with %d", k, f.ID, len(f.Payload), want, len(payload))
					return
				}
				buf = f.Payload
			}
		}
		errs <- nil
	})
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	progress, moved := int64(-1), time.Now()
	stalled := false
wait:
	for {
		select {
		case <-done:
			break wait
		case <-time.After(100 * time.Millisecond):
		}
		if n := arrived[0].Load() + arrived[1].Load(); n != progress {
			progress, moved = n, time.Now()
			continue
		}
		if time.Since(moved) < stall {
			continue
		}
		r := &gw.rings[requestRing]
		t.Errorf("stalled for %v: producer at round %d, consumer at round %d; head %d, tail %d, dataWaiting %d, spaceWaiting %d",
			stall, arrived[0].Load(), arrived[1].Load(), r.head.Load(), r.tail.Load(), r.dataWaiting.Load(), r.spaceWaiting.Load())
		// Closing wakes both sleepers; stop ends the spins.
		stalled = true
		stop.Store(true)
		gw.shut()
		<-done
		break
	}
	close(errs)
	for err := range errs {
		// After a stall the close's ErrClosed says nothing more.
		if err != nil && !stalled {
			t.Error(err)
		}
	}
}

func TestRingTooLarge(t *testing.T) {
	gw, _ := newPair(t, MinRingSize)
	for _, n := range []int{gw.MaxPayload() + 1, MinRingSize, 1 << 20} {
		err := gw.send(requestRing, FrameToken, 1, make([]byte, n))
		if !errors.Is(err, ErrFrameTooLarge) {
			t.Errorf("send %d bytes: got %v, want ErrFrameTooLarge", n, err)
		}
	}
	// The failed sends left the ring usable.
	if err := gw.send(requestRing, FrameToken, 2, []byte("ok")); err != nil {
		t.Fatal(err)
	}
}

func TestRingFullBlocksProducer(t *testing.T) {
	checkGoroutines(t)
	gw, wk := newPair(t, MinRingSize)
	const payload = 1024 - frameHeaderSize // 1024-byte records: four fill the ring
	var wg sync.WaitGroup
	defer wg.Wait()
	sent := make(chan error, 1)
	wg.Go(func() {
		for i := range uint64(5) {
			if err := gw.send(requestRing, FrameToken, i, pattern(i, payload)); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	})
	r := &gw.rings[requestRing]
	waitWord(t, "producer's spaceWaiting", r.spaceWaiting.Load, 1)
	if got := r.tail.Load(); got != MinRingSize {
		t.Fatalf("producer asleep with tail %d, want the ring full at %d", got, MinRingSize)
	}
	var buf []byte
	for i := range uint64(5) {
		f, err := wk.recv(requestRing, buf)
		if err != nil {
			t.Fatal(err)
		}
		if f.ID != i || !bytes.Equal(f.Payload, pattern(i, payload)) {
			t.Fatalf("frame %d: wrong id %d or payload", i, f.ID)
		}
		buf = f.Payload
	}
	if err := <-sent; err != nil {
		t.Fatalf("blocked producer: %v", err)
	}
}

func TestRingEmptySleepsConsumer(t *testing.T) {
	checkGoroutines(t)
	gw, wk := newPair(t, MinRingSize)
	var wg sync.WaitGroup
	defer wg.Wait()
	got := make(chan Frame, 1)
	wg.Go(func() {
		f, err := wk.recv(requestRing, nil)
		if err != nil {
			t.Errorf("recv: %v", err)
		}
		got <- f
	})
	waitWord(t, "consumer's dataWaiting", wk.rings[requestRing].dataWaiting.Load, 1)
	if err := gw.send(requestRing, FrameCancel, 99, nil); err != nil {
		t.Fatal(err)
	}
	if f := <-got; f.Type != FrameCancel || f.ID != 99 {
		t.Errorf("got %v %d, want cancel 99", f.Type, f.ID)
	}
	if w := wk.rings[requestRing].dataWaiting.Load(); w != 0 {
		t.Errorf("dataWaiting is %d after the wake, want 0", w)
	}
}

func TestCloseWakesBlocked(t *testing.T) {
	for _, closer := range []string{"peer shut", "own shut", "own segment close"} {
		t.Run(closer, func(t *testing.T) {
			checkGoroutines(t)
			gw, wk := newPair(t, MinRingSize)
			// Fill the gateway's request ring so its next send blocks.
			for gw.rings[requestRing].tail.Load() < MinRingSize {
				if err := gw.send(requestRing, FrameToken, 1, make([]byte, MinRingSize/4-frameHeaderSize)); err != nil {
					t.Fatal(err)
				}
			}
			var wg sync.WaitGroup
			errs := make(chan error, 2)
			wg.Go(func() { errs <- gw.send(requestRing, FrameToken, 2, nil) })
			wg.Go(func() {
				_, err := gw.recv(responseRing, nil)
				errs <- err
			})
			waitWord(t, "spaceWaiting", gw.rings[requestRing].spaceWaiting.Load, 1)
			waitWord(t, "dataWaiting", gw.rings[responseRing].dataWaiting.Load, 1)
			switch closer {
			case "peer shut":
				wk.shut()
			case "own shut":
				gw.shut()
			case "own segment close":
				if err := gw.Close(); err != nil {
					t.Fatal(err)
				}
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if !errors.Is(err, ErrClosed) {
					t.Errorf("blocked call returned %v, want ErrClosed", err)
				}
			}
			// A closed segment refuses new work at once.
			if err := wk.send(responseRing, FrameToken, 3, nil); !errors.Is(err, ErrClosed) {
				t.Errorf("send after close: got %v, want ErrClosed", err)
			}
		})
	}
}

func TestRecvDrainsBeforeClosed(t *testing.T) {
	gw, wk := newPair(t, MinRingSize)
	if err := wk.send(responseRing, FrameDone, 5, []byte("last")); err != nil {
		t.Fatal(err)
	}
	wk.shut()
	f, err := gw.recv(responseRing, nil)
	if err != nil || f.ID != 5 {
		t.Fatalf("got %v, %v; want the frame sent before the close", f, err)
	}
	if _, err := gw.recv(responseRing, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("got %v, want ErrClosed", err)
	}
}

func TestRingCorruptByPeer(t *testing.T) {
	tests := map[string]func(r *ring){
		"tail not a record": func(r *ring) { r.tail.Store(8) },
		"tail beyond ring":  func(r *ring) { r.tail.Store(2 * MinRingSize) },
		"length past tail": func(r *ring) {
			putFrameHeader(r.data, 500, FrameToken, 1)
			r.tail.Store(32)
		},
		"skip past tail": func(r *ring) {
			putFrameHeader(r.data, skipMarker, 0, 0)
			r.tail.Store(16)
		},
		"checksum mismatch": func(r *ring) {
			payload := []byte("a token")
			putFrameHeader(r.data, uint32(len(payload)), FrameToken, 1)
			sealFrame(r.data, payload)
			copy(r.data[frameHeaderSize:], "a tokem")
			r.tail.Store(recordSize(len(payload)))
		},
		"bad magic": func(r *ring) {
			putFrameHeader(r.data, 0, FrameHeartbeat, 0)
			sealFrame(r.data, nil)
			r.data[5] = 0x33
			r.tail.Store(recordSize(0))
		},
		"random bytes": func(r *ring) {
			rng := rand.New(rand.NewPCG(1, 2))
			for i := range 256 {
				r.data[i] = byte(rng.Uint32())
			}
			r.data[0], r.data[1], r.data[2], r.data[3] = 40, 0, 0, 0 // in bounds, so the check must catch it
			r.tail.Store(256)
		},
	}
	for name, corrupt := range tests {
		t.Run(name, func(t *testing.T) {
			gw, wk := newPair(t, MinRingSize)
			corrupt(&wk.rings[responseRing])
			if _, err := gw.recv(responseRing, nil); !errors.Is(err, ErrCorrupt) {
				t.Errorf("got %v, want ErrCorrupt", err)
			}
		})
	}
}

func TestHeartbeatWatch(t *testing.T) {
	gwSeg, wkSeg := newPair(t, MinRingSize)
	w := NewWorkerEnd(wkSeg)
	watch := NewGatewayEnd(gwSeg, GatewayEndConfig{}).HeartbeatWatch()
	t0 := time.Unix(1000, 0)
	if got := watch.Stalled(t0); got != 0 {
		t.Errorf("first reading: got %v, want 0", got)
	}
	if got := watch.Stalled(t0.Add(3 * time.Second)); got != 3*time.Second {
		t.Errorf("no beat for 3s: got %v, want 3s", got)
	}
	w.Beat()
	if got := watch.Stalled(t0.Add(4 * time.Second)); got != 0 {
		t.Errorf("after a beat: got %v, want 0", got)
	}
	if got := watch.Stalled(t0.Add(6 * time.Second)); got != 2*time.Second {
		t.Errorf("2s after the beat: got %v, want 2s", got)
	}
	gwSeg.Close()
	if got := watch.Stalled(t0.Add(time.Hour)); got != 0 {
		t.Errorf("closed segment: got %v, want 0", got)
	}
}

// TestRingBatch sends batches many times the ring's size with sendBatch,
// so the producer must publish part of a batch and sleep for space in the
// middle of it, and reads them with recvBatch through a buffer smaller than
// a batch, across many wraparounds. Every frame arrives once, in order,
// intact.
func TestRingBatch(t *testing.T) {
	checkGoroutines(t)
	gw, wk := newPair(t, MinRingSize)
	const batches, perBatch = 40, 50
	sizes := []int{0, 1, 16, 100, 700, 1500}
	want := func(i int) Frame {
		return Frame{Type: FrameToken, ID: uint64(i), Payload: pattern(uint64(i), sizes[i%len(sizes)])}
	}
	sent := make(chan error, 1)
	go func() {
		frames := make([]Frame, 0, perBatch)
		for b := range batches {
			frames = frames[:0]
			for j := range perBatch {
				frames = append(frames, want(b*perBatch+j))
			}
			if err := gw.sendBatch(requestRing, frames); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	frames := make([]Frame, 0, 16)
	buf := make([]byte, 0, 2048)
	got, calls := 0, 0
	for got < batches*perBatch {
		fs, err := wk.recvBatch(requestRing, frames[:0], buf)
		if err != nil {
			t.Fatalf("recvBatch after %d frames: %v", got, err)
		}
		calls++
		if len(fs) == 0 || len(fs) > cap(frames) {
			t.Fatalf("recvBatch returned %d frames", len(fs))
		}
		for _, f := range fs {
			w := want(got)
			if f.Type != w.Type || f.ID != w.ID || !bytes.Equal(f.Payload, w.Payload) {
				t.Fatalf("frame %d: got type %v id %d len %d, payload equal %v", got, f.Type, f.ID, len(f.Payload), bytes.Equal(f.Payload, w.Payload))
			}
			got++
		}
	}
	if err := <-sent; err != nil {
		t.Fatalf("sendBatch: %v", err)
	}
	if wraps := gw.rings[requestRing].tail.Load() / MinRingSize; wraps < 50 {
		t.Errorf("ring wrapped %d times, want at least 50", wraps)
	}
	t.Logf("%d frames in %d recvBatch calls", got, calls)
}

// Stats reports what waits in each ring and counts the doorbells rung for a
// sleeping consumer.
func TestSegmentStats(t *testing.T) {
	seg, err := NewSegment(MinRingSize)
	if err != nil {
		t.Fatal(err)
	}
	defer seg.Close()
	if st := seg.Stats(); st != (RingStats{}) {
		t.Fatalf("fresh segment: %+v, want zeros", st)
	}
	if err := seg.send(requestRing, FrameCancel, 7, make([]byte, 40)); err != nil {
		t.Fatal(err)
	}
	st := seg.Stats()
	if st.ToWorkerBytes == 0 || st.ToGatewayBytes != 0 {
		t.Errorf("after one request frame: %+v, want bytes toward the worker only", st)
	}
	if st.Wakeups != 0 {
		t.Errorf("no consumer slept, yet %d wake-ups were counted", st.Wakeups)
	}
	buf := make([]byte, MinRingSize)
	if _, err := seg.recv(requestRing, buf); err != nil {
		t.Fatal(err)
	}
	if st := seg.Stats(); st.ToWorkerBytes != 0 {
		t.Errorf("after reading the frame: %+v, want the ring empty", st)
	}
	// A consumer that sleeps is woken by the next publish, once.
	got := make(chan error, 1)
	go func() {
		_, err := seg.recv(requestRing, buf)
		got <- err
	}()
	for seg.rings[requestRing].dataWaiting.Load() == 0 {
		runtime.Gosched()
	}
	if err := seg.send(requestRing, FrameCancel, 8, nil); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if st := seg.Stats(); st.Wakeups != 1 {
		t.Errorf("one sleeping consumer woken: %d wake-ups counted, want 1", st.Wakeups)
	}
}
