//go:build linux

package transport

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Errors callers branch on.
var (
	// ErrClosed reports that the segment was closed by either side, or by the
	// gateway after the worker process died.
	ErrClosed = errors.New("transport: closed")
	// ErrFrameTooLarge reports a frame whose record cannot fit in the ring.
	ErrFrameTooLarge = errors.New("transport: frame too large for ring")
	// ErrCorrupt reports a ring whose shared state the peer left inconsistent.
	// The segment cannot be trusted after it and should be closed.
	ErrCorrupt = errors.New("transport: ring corrupt")
)

// Ring sizes. A ring holds whole records (a 16-byte header and the payload,
// padded to 16 bytes), so the largest payload is the ring size less 16.
const (
	DefaultRingSize = 1 << 20
	MinRingSize     = 4 << 10
	MaxRingSize     = 1 << 30
)

// Layout of the segment. The first page is the header; the request ring's
// data (gateway → worker) follows it, then the response ring's data.
//
//	0      magic    uint64
//	8      version  uint32
//	12     header   uint32 (bytes before the first ring's data)
//	16     ringSize uint64
//	24     closed   uint32 (set by whichever side closes first)
//	line 1..4      request ring:  head, tail, dataWaiting, spaceWaiting
//	line 5..8      response ring: head, tail, dataWaiting, spaceWaiting
//	line 9         heartbeat uint64, counted up by the worker's loop
//
// The dataWaiting line also holds, at byte 8, rungAt int64: when the
// producer last rang that doorbell (wall clock, ns), which tells the
// consumer how long its data really took (spin.go).
//
// Every index and futex word has a line of its own so the producer's tail
// stores and the consumer's head stores never bounce one cache line between
// the cores. The line is 128 bytes, not 64, because x86's adjacent-line
// prefetcher pulls lines in pairs and would recreate the false sharing.
const (
	segmentMagic   = 0x0031_6d68_7369_3368 // "h3ishm1\x00" little-endian
	segmentVersion = 2
	headerSize     = 4096
	lineSize       = 128

	offMagic    = 0
	offVersion  = 8
	offHeader   = 12
	offRingSize = 16
	offClosed   = 24

	offHeartbeat = lineSize * 9

	ringLines       = 4
	lineHead        = 0
	lineTail        = 1
	lineDataWaiting = 2
	lineSpaceWait   = 3
	offRungAt       = 8 // within the dataWaiting line
)

// Ring indices within a segment.
const (
	requestRing  = 0 // gateway produces, worker consumes
	responseRing = 1 // worker produces, gateway consumes
)

// Segment is a shared-memory region holding the two rings between a gateway
// and one worker process. The gateway creates it with NewSegment and hands
// File to the child; the child maps the same memory with OpenSegment.
//
// A Segment must not be closed while an endpoint still uses it from another
// goroutine: Close waits for ring operations in flight to notice the closed
// flag and return before it unmaps the memory.
type Segment struct {
	file     *os.File
	ringSize int

	// mu guards the mapping's lifetime: ring operations hold it for reading
	// (a blocked Recv holds it while asleep), Close takes it for writing only
	// after waking every sleeper, then unmaps. Without it an unmap under a
	// sleeping peer goroutine would turn into a fault instead of ErrClosed.
	mu        sync.RWMutex
	mem       []byte // nil once closed
	rings     [2]ring
	heartbeat *atomic.Uint64
}

// NewSegment creates a sealed memfd of the right size, maps it, and writes
// the header. ringSize is the capacity of each ring in bytes: a power of two
// between MinRingSize and MaxRingSize, or 0 for DefaultRingSize.
func NewSegment(ringSize int) (*Segment, error) {
	if ringSize == 0 {
		ringSize = DefaultRingSize
	}
	if err := checkRingSize(uint64(ringSize)); err != nil {
		return nil, err
	}
	size := headerSize + 2*ringSize
	fd, err := unix.MemfdCreate("h3infer-ring", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("transport: memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "h3infer-ring")
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		f.Close()
		return nil, fmt.Errorf("transport: size segment to %d bytes: %w", size, err)
	}
	// Sealing the size means neither process can shrink the file under the
	// other's mapping, which would turn the next access into SIGBUS.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		f.Close()
		return nil, fmt.Errorf("transport: seal segment: %w", err)
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("transport: map segment: %w", err)
	}
	binary.LittleEndian.PutUint64(mem[offMagic:], segmentMagic)
	binary.LittleEndian.PutUint32(mem[offVersion:], segmentVersion)
	binary.LittleEndian.PutUint32(mem[offHeader:], headerSize)
	binary.LittleEndian.PutUint64(mem[offRingSize:], uint64(ringSize))
	return newSegment(f, mem, ringSize), nil
}

// OpenSegment maps a segment created by NewSegment in another process,
// typically the file the child received as exec.Cmd.ExtraFiles[0] (fd 3).
// It checks the header, the file's size and its seals before trusting any of
// it. On success the Segment owns f; on failure f is left open.
func OpenSegment(f *os.File) (*Segment, error) {
	var st unix.Stat_t
	fd := int(f.Fd())
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("transport: stat segment: %w", err)
	}
	if st.Size < headerSize {
		return nil, fmt.Errorf("transport: segment is %d bytes, shorter than its header", st.Size)
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		return nil, fmt.Errorf("transport: read segment seals: %w", err)
	}
	if seals&unix.F_SEAL_SHRINK == 0 {
		return nil, errors.New("transport: segment is not sealed against shrinking")
	}
	mem, err := unix.Mmap(fd, 0, int(st.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("transport: map segment: %w", err)
	}
	ringSize, err := checkHeader(mem)
	if err != nil {
		unix.Munmap(mem)
		return nil, err
	}
	return newSegment(f, mem, int(ringSize)), nil
}

func checkRingSize(n uint64) error {
	if n < MinRingSize || n > MaxRingSize || bits.OnesCount64(n) != 1 {
		return fmt.Errorf("transport: ring size %d: must be a power of two in [%d, %d]", n, MinRingSize, MaxRingSize)
	}
	return nil
}

func checkHeader(mem []byte) (uint64, error) {
	if m := binary.LittleEndian.Uint64(mem[offMagic:]); m != segmentMagic {
		return 0, fmt.Errorf("transport: segment magic %#x, want %#x", m, uint64(segmentMagic))
	}
	if v := binary.LittleEndian.Uint32(mem[offVersion:]); v != segmentVersion {
		return 0, fmt.Errorf("transport: segment version %d, want %d", v, segmentVersion)
	}
	if h := binary.LittleEndian.Uint32(mem[offHeader:]); h != headerSize {
		return 0, fmt.Errorf("transport: segment header size %d, want %d", h, headerSize)
	}
	n := binary.LittleEndian.Uint64(mem[offRingSize:])
	if err := checkRingSize(n); err != nil {
		return 0, err
	}
	if want := uint64(headerSize) + 2*n; uint64(len(mem)) != want {
		return 0, fmt.Errorf("transport: segment is %d bytes, header says %d", len(mem), want)
	}
	return n, nil
}

func newSegment(f *os.File, mem []byte, ringSize int) *Segment {
	s := &Segment{file: f, ringSize: ringSize, mem: mem, heartbeat: word64(mem, offHeartbeat)}
	closed := word32(mem, offClosed)
	for i := range s.rings {
		ctl := lineSize * (1 + i*ringLines)
		data := headerSize + i*ringSize
		s.rings[i] = ring{
			head:         word64(mem, ctl+lineHead*lineSize),
			tail:         word64(mem, ctl+lineTail*lineSize),
			dataWaiting:  word32(mem, ctl+lineDataWaiting*lineSize),
			rungAt:       (*atomic.Int64)(unsafe.Pointer(&mem[ctl+lineDataWaiting*lineSize+offRungAt])),
			spaceWaiting: word32(mem, ctl+lineSpaceWait*lineSize),
			closed:       closed,
			data:         mem[data : data+ringSize : data+ringSize],
			size:         uint64(ringSize),
			mask:         uint64(ringSize - 1),
		}
		// A segment opened in a second process starts where the first left
		// off, so each side's private cursors come from the shared indices.
		r := &s.rings[i]
		r.prodTail = r.tail.Load()
		r.pubTail = r.prodTail
		r.prodHead = r.head.Load()
		r.consHead = r.head.Load()
		r.consTail = r.tail.Load()
	}
	return s
}

// word64 and word32 view an aligned word of the mapping as an atomic. The
// mapping is page-aligned and every offset used here is a multiple of 8, so
// the atomics are naturally aligned, which x86 needs for them to be atomic
// across processes (a split lock would be neither atomic nor fast).
func word64(mem []byte, off int) *atomic.Uint64 {
	return (*atomic.Uint64)(unsafe.Pointer(&mem[off]))
}

func word32(mem []byte, off int) *atomic.Uint32 {
	return (*atomic.Uint32)(unsafe.Pointer(&mem[off]))
}

// RingStats is what one process sees of a segment's two rings.
type RingStats struct {
	// ToWorkerBytes and ToGatewayBytes are the bytes published and not yet
	// consumed in each direction, record framing included.
	ToWorkerBytes, ToGatewayBytes uint64
	// Wakeups counts the doorbells this process rang: futex wakes of a
	// consumer sleeping for data or a producer sleeping for space.
	Wakeups uint64
	// Spins counts the waits for data in this process that a spin ended
	// before the consumer slept (spin.go): the wake-ups it saved.
	Spins uint64
}

// Stats reads the rings' occupancy from the mapping and this process's
// wake-up count. It is safe to call at any time before Close.
func (s *Segment) Stats() RingStats {
	used := func(r *ring) uint64 { return r.tail.Load() - r.head.Load() }
	return RingStats{
		ToWorkerBytes:  used(&s.rings[requestRing]),
		ToGatewayBytes: used(&s.rings[responseRing]),
		Wakeups:        s.rings[0].wakes.Load() + s.rings[1].wakes.Load(),
		Spins:          s.rings[0].spins.Load() + s.rings[1].spins.Load(),
	}
}

// RingSize reports each ring's capacity in bytes.
func (s *Segment) RingSize() int { return s.ringSize }

// MaxPayload reports the largest frame payload a ring of this segment takes.
func (s *Segment) MaxPayload() int { return s.ringSize - frameHeaderSize }

// File returns the memfd, for passing to a child in exec.Cmd.ExtraFiles.
// The Segment keeps ownership; the caller must not close it.
func (s *Segment) File() *os.File { return s.file }

// Close marks the segment closed for both processes, wakes every sleeper,
// waits for ring operations in flight to return, then unmaps the memory and
// closes the file. It is safe to call more than once.
func (s *Segment) Close() error {
	s.shut()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mem == nil {
		return nil
	}
	err := unix.Munmap(s.mem)
	s.mem = nil
	if cerr := s.file.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("transport: close segment: %w", err)
	}
	return nil
}

// shut sets the shared closed flag and wakes every sleeper in both processes,
// leaving the mapping in place.
func (s *Segment) shut() {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.mem == nil {
		return
	}
	s.rings[0].closed.Store(1)
	for i := range s.rings {
		s.rings[i].wakeAll()
	}
}

// acquire pins the mapping for one ring operation; it reports false once the
// segment has been unmapped.
func (s *Segment) acquire() bool {
	s.mu.RLock()
	if s.mem == nil {
		s.mu.RUnlock()
		return false
	}
	return true
}

func (s *Segment) release() { s.mu.RUnlock() }

// send writes one frame into ring i.
func (s *Segment) send(i int, typ FrameType, id uint64, payload []byte) error {
	if !s.acquire() {
		return ErrClosed
	}
	defer s.release()
	return s.rings[i].send(typ, id, payload)
}

// sendBatch writes frames into ring i and publishes them together.
func (s *Segment) sendBatch(i int, frames []Frame) error {
	if !s.acquire() {
		return ErrClosed
	}
	defer s.release()
	return s.rings[i].sendBatch(frames)
}

// recv reads one frame from ring i, copying the payload into buf's storage.
func (s *Segment) recv(i int, buf []byte) (Frame, error) {
	if !s.acquire() {
		return Frame{}, ErrClosed
	}
	defer s.release()
	return s.rings[i].recv(buf)
}

// recvBatch reads every frame already published on ring i, up to
// cap(frames), sleeping only while there is none; see ring.recvBatch.
func (s *Segment) recvBatch(i int, frames []Frame, buf []byte) ([]Frame, error) {
	if !s.acquire() {
		return frames, ErrClosed
	}
	defer s.release()
	return s.rings[i].recvBatch(frames, buf)
}

// beat counts the worker's heartbeat up by one.
func (s *Segment) beat() {
	if !s.acquire() {
		return
	}
	defer s.release()
	s.heartbeat.Add(1)
}

// beats reads the heartbeat counter; ok is false once the segment is closed.
func (s *Segment) beats() (n uint64, ok bool) {
	if !s.acquire() {
		return 0, false
	}
	defer s.release()
	return s.heartbeat.Load(), true
}
