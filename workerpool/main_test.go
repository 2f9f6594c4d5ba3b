package workerpool

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"unsafe"

	"h3infer/internal/demoenv"

	"golang.org/x/sys/unix"

	"h3infer/engine"
	"h3infer/infer"
	"h3infer/ort"
	"h3infer/transport"
	"h3infer/workerconf"
)

// testWorkerEnv marks a re-execution of this test binary as a worker
// process: the Pool tests run the binary they are in as the worker, so
// real processes run the real engine.Run, with ONNX Runtime's models,
// without a separately built h3infer.
const testWorkerEnv = "H3INFER_WORKERPOOL_TEST_WORKER"

// testMisbehaveEnv makes the test worker process misbehave instead of
// serving: "hang" says it is ready and then never beats its heartbeat,
// "garbage" says it is ready and then publishes random bytes on its
// response ring.
const testMisbehaveEnv = "H3INFER_WORKERPOOL_TEST_MISBEHAVE"

// testHostileOnceEnv names a file holding a hostile mode (see hostile).
// The first worker process to remove the file plays that mode; every
// later one, the replacements included, serves normally.
const testHostileOnceEnv = "H3INFER_WORKERPOOL_TEST_HOSTILE_ONCE"

// demo is the runtime and the demo model, set up for the whole binary on
// first use (internal/demoenv).
var demo = demoenv.Env{Prefix: "h3infer-workerpool-test-", Init: ort.InitRuntime}

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "worker" && os.Getenv(testWorkerEnv) == "1" {
		os.Exit(testWorkerMain(os.Args[2:]))
	}
	code := m.Run()
	demo.Remove()
	os.Exit(code)
}

// needModel fails the test when the runtime or the demo model is missing.
func needModel(t testing.TB) {
	t.Helper()
	demo.Need(t)
}

// testWorkerMain is the worker process of the Pool tests: it reads its
// settings as cmd/h3infer does and serves them, unless the environment
// asks it to misbehave.
func testWorkerMain(args []string) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	s, err := workerconf.ParseArgs(args)
	if err != nil {
		log.Error("worker settings", "err", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if path := os.Getenv(testHostileOnceEnv); path != "" {
		// Reading and then removing claims the file: of two processes that
		// read it, only one removes it.
		if mode, err := os.ReadFile(path); err == nil && os.Remove(path) == nil {
			if err := hostile(ctx, string(mode), workerconf.RingFD); err != nil {
				log.Error("hostile worker failed", "err", err)
				return 1
			}
			return 0
		}
	}
	if mode := os.Getenv(testMisbehaveEnv); mode != "" {
		if err := misbehave(ctx, mode, workerconf.RingFD); err != nil {
			log.Error("misbehaving worker failed", "err", err)
			return 1
		}
		return 0
	}
	load := func(spec workerconf.Model) (engine.Model, error) {
		m, err := ort.Open(s, spec, log)
		if err != nil {
			return nil, err
		}
		return m, nil
	}
	if err := engine.Run(ctx, os.NewFile(workerconf.RingFD, "h3infer-ring"), engine.Config{Settings: s, Load: load}, log); err != nil {
		log.Error("worker failed", "err", err)
		return 1
	}
	return 0
}

// testLogger sends log records to the test's log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// attachReady opens the ring at fd as the worker end and says it is ready
// with one slot for "demo", as the broken workers below do first.
func attachReady(fd int) (*transport.Segment, *transport.WorkerEnd, error) {
	seg, err := transport.OpenSegment(os.NewFile(uintptr(fd), "ring"))
	if err != nil {
		return nil, nil, err
	}
	end := transport.NewWorkerEnd(seg)
	ready := transport.Ready{PID: uint32(os.Getpid()), Slots: 1, Models: []infer.ModelInfo{{Name: "demo", ContextLength: 64}}}
	if err := end.SendReady(ready); err != nil {
		seg.Close()
		return nil, nil, err
	}
	return seg, end, nil
}

// misbehave plays a broken worker on the ring at fd. It returns when ctx
// ends (the pool's SIGTERM) or the process is killed.
func misbehave(ctx context.Context, mode string, fd int) error {
	seg, _, err := attachReady(fd)
	if err != nil {
		return err
	}
	defer seg.Close()
	switch mode {
	case "hang":
	case "garbage":
		if err := scribble(fd, seg.RingSize()); err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown misbehaviour %q", mode)
	}
	<-ctx.Done()
	return nil
}

// scribble publishes 512 random bytes on the response ring through a
// mapping of its own, bypassing the transport's writer (see publishRaw).
func scribble(fd, ringSize int) error {
	return publishRaw(fd, ringSize, func(rec []byte) int {
		rng := rand.New(rand.NewPCG(uint64(os.Getpid()), 9))
		for i := range rec {
			rec[i] = byte(rng.Uint32())
		}
		binary.LittleEndian.PutUint32(rec, 100) // in bounds: only the checks can tell
		return len(rec)
	})
}

// Hostile modes: each says it is ready, waits for a submit, sends one good
// token for it, and then breaks the protocol in its own way.
const (
	// hostilePastEnd publishes a record whose length runs past the end of
	// the ring.
	hostilePastEnd = "length-past-end"
	// hostileBadCheck publishes a token frame for the open request whose
	// payload does not match its CRC-32C.
	hostileBadCheck = "bad-checksum"
	// hostileUnknownID sends well-formed tokens for a request that was
	// never opened.
	hostileUnknownID = "unknown-id"
	// hostileFlood floods the ring with well-formed worker-level frames
	// (heartbeat and stats) as fast as it takes them, and never answers
	// the request nor beats its heartbeat.
	hostileFlood = "flood"
)

// hostile plays a compromised worker on the ring at fd. It returns when
// ctx ends (the pool's SIGTERM), or the process is killed.
func hostile(ctx context.Context, mode string, fd int) error {
	seg, end, err := attachReady(fd)
	if err != nil {
		return err
	}
	defer seg.Close()
	var id uint64
	for {
		f, err := end.Recv()
		if err != nil {
			return err
		}
		if f.Type == transport.FrameSubmit {
			id = f.ID
			break
		}
	}
	if err := end.SendToken(id, infer.Token{Count: 1, Text: "hostile "}); err != nil {
		return err
	}
	switch mode {
	case hostilePastEnd:
		err = publishRaw(fd, seg.RingSize(), func(rec []byte) int {
			putHeader(rec, uint32(seg.RingSize()), transport.FrameToken, id)
			return 32
		})
	case hostileBadCheck:
		err = publishRaw(fd, seg.RingSize(), func(rec []byte) int {
			payload := transport.AppendToken(nil, &infer.Token{Count: 1, Text: "forged"})
			putHeader(rec, uint32(len(payload)), transport.FrameToken, id)
			copy(rec[24:], payload)
			check := crc32.Update(crc32.Checksum(rec[:16], castagnoli), castagnoli, payload)
			binary.LittleEndian.PutUint32(rec[16:], check)
			rec[24+len(payload)-1] ^= 1 // after the check, as a torn write would
			return (24 + len(payload) + 15) &^ 15
		})
	case hostileUnknownID:
		for i := range uint64(100) {
			if err = end.SendToken(id+1000+i, infer.Token{Count: 1, Text: "stray "}); err != nil {
				break
			}
		}
	case hostileFlood:
		// Until the gateway closes the ring or kills the process.
		for ctx.Err() == nil && err == nil {
			if err = end.SendHeartbeat(); err == nil {
				err = end.SendStats(transport.Stats{TokensGenerated: 1 << 40, Active: 1})
			}
		}
		if errors.Is(err, transport.ErrClosed) {
			err = nil
		}
	default:
		err = fmt.Errorf("unknown hostile mode %q", mode)
	}
	if err != nil && !errors.Is(err, transport.ErrClosed) {
		return err
	}
	<-ctx.Done()
	return nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// putHeader writes a frame header as transport/frame.go lays it out, with
// a zero check: length, type, magic 0xb3, id.
func putHeader(b []byte, length uint32, typ transport.FrameType, id uint64) {
	clear(b[:24])
	binary.LittleEndian.PutUint32(b, length)
	b[4], b[5] = byte(typ), 0xb3
	binary.LittleEndian.PutUint64(b[8:], id)
}

// publishRaw lets write fill up to 512 bytes of the response ring at its
// tail, through a mapping of its own that bypasses the transport's writer,
// and publishes the bytes it reports. The offsets are the segment layout
// documented in transport/segment.go: the response ring's tail on line 6,
// its data-waiting futex word on line 7 (128-byte lines), its data after
// the 4096-byte header and the request ring.
func publishRaw(fd, ringSize int, write func(rec []byte) int) error {
	const (
		line        = 128
		tailOff     = 6 * line
		waitingOff  = 7 * line
		headerBytes = 4096
	)
	mem, err := unix.Mmap(fd, 0, headerBytes+2*ringSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	defer unix.Munmap(mem)
	tail := (*atomic.Uint64)(unsafe.Pointer(&mem[tailOff]))
	waiting := (*atomic.Uint32)(unsafe.Pointer(&mem[waitingOff]))
	data := mem[headerBytes+ringSize:]
	t := tail.Load()
	off := int(t) & (ringSize - 1)
	if off+512 > ringSize {
		return fmt.Errorf("no room for a record at offset %d", off)
	}
	n := write(data[off : off+512])
	tail.Store(t + uint64(n))
	waiting.Store(0)
	_, _, errno := unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(waiting)), 1 /* FUTEX_WAKE, shared */, 1, 0, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}
