//go:build linux

package transport

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"
)

// ring is one process's view of a single-producer single-consumer byte ring
// in a Segment. One goroutine at a time may produce and one may consume; the
// endpoints serialize their callers with mutexes.
//
// # Records
//
// Each frame is one record: the 24-byte frame header (see frame.go) followed
// by the payload, padded to a multiple of 16 bytes. The consumer checks every
// record's magic, bounds and CRC-32C before it hands the frame on; a record
// that fails is ErrCorrupt, which ends the segment. head and tail are byte
// counts that only grow (2^64 bytes would take centuries to wrap); the offset
// in the ring is the count masked by size-1.
//
// # Wraparound: a skip marker, not a split copy
//
// A record never straddles the end of the ring. When it would, the producer
// writes a skip marker (a length word of skipMarker) in the space left
// before the end and starts the record at offset 0. Records stay contiguous,
// so the consumer decodes each header with plain loads and copies a payload
// with a single copy, and a corrupt length from the peer is caught by a bounds
// check rather than by arithmetic on two pieces. The cost is the unused tail
// of the ring at each wrap. Because records are multiples of 16 bytes, the
// space left before the end is always a multiple of 16, so a skip marker's
// length word always fits there. Any record up to the whole ring still fits: the producer
// publishes the skip marker first, then waits for the ring to drain to
// offset 0.
//
// # Memory ordering
//
// The producer writes the record with plain stores and then publishes it by
// storing tail atomically; the consumer loads tail atomically and only then
// reads the record. Symmetrically, the consumer copies the payload out and
// then stores head; the producer loads head before writing into the space it
// frees. The Go memory model makes atomics sequentially consistent and orders
// plain accesses around them within a program; the compiler emits the same
// machine code when the other party is another process, and on amd64 that
// code is what carries the argument across processes: the stores of tail,
// head and the doorbell flags are Swaps, each an XCHG (a full barrier, so
// every earlier data store is visible before the new tail and no later load
// runs ahead of it), an atomic load is a plain MOV, and x86-TSO never lets a
// later load pass an earlier load, nor a store pass an earlier load. So a
// consumer that sees tail = t sees every byte written before t was stored,
// and a producer that sees head = h knows the consumer is done reading below h.
//
// Those stores are Swaps rather than Stores because a Store is an XCHG only
// in a normal build. Under the race detector an atomic on memory outside Go's
// heap, as this mapping is, takes the race runtime's unchecked path, where a
// Store is a plain MOV; x86 lets a later load complete while that store still
// sits in the core's store buffer, and the doorbell handshake below relies on
// exactly that not happening. A Swap is an XCHG in every build, the same
// instruction a normal build's Store is.
//
// # Doorbells
//
// Sleeping, not spinning, is the default: with two processes on two shared
// cores, a spinner steals the core its peer needs. (A consumer whose recent
// waits were short polls briefly first, bounded and never while idle; see
// spin.go.) A consumer with nothing to
// read stores 1 in dataWaiting, re-reads tail, and sleeps on the futex word
// only if the ring is still empty. A producer, after storing tail, loads
// dataWaiting and, when it is 1, clears it with a compare-and-swap and wakes
// the sleeper. Both sides store first, with a full barrier, and load second,
// so at least one side sees the other: either the consumer sees the new tail
// and does not sleep, or the producer sees the flag and wakes it. Were either
// load to pass its side's store, both could miss: the consumer sleeps on an
// old tail and the producer skips the wake, and nothing wakes the consumer
// again. The CAS makes exactly one publish pay for the wake syscall per
// sleep, instead of every publish (measured here: five times slower). A
// producer facing a full ring does the mirror image on spaceWaiting and head.
//
// Close stores the closed flag, then clears both flags and wakes both words.
// A sleeper re-reads closed after setting its flag, and futex_wait refuses to
// sleep when the flag is no longer 1, so no sleeper misses a close: the
// closer's two stores reach memory in order, so a sleeper that still reads
// closed as 0 set its flag before the closer cleared it, and its futex_wait
// either finds 0 or is already asleep when the wake comes.
//
// The futex sleep blocks an OS thread. The waiting code holds
// runtime.LockOSThread while it sleeps, and only then: a goroutine that
// stays locked after it wakes hands its processor to another thread each
// time it blocks, and whatever it readied waits for the kernel to wake that
// thread.
type ring struct {
	head, tail                *atomic.Uint64
	dataWaiting, spaceWaiting *atomic.Uint32
	closed                    *atomic.Uint32
	data                      []byte
	// wakes counts the futex wakes this process rang on this ring (its
	// own side only; it lives in process memory, not in the mapping).
	wakes      atomic.Uint64
	size, mask uint64

	// Producer-private: the next write position, the last position
	// published to tail, and the last head seen, so that a producer with
	// room to spare never touches the consumer's line.
	prodTail, pubTail, prodHead uint64
	// Consumer-private, the mirror image, and where the consumer last woke
	// a producer waiting for space.
	consHead, consTail, consWoke uint64
	consHeader                   [frameHeaderSize]byte
	batching                     bool // in recvBatch: consume defers the store of head
	// waits is the consumer's record of how long it waited for data,
	// which decides whether it spins before it sleeps (spin.go).
	waits spinner
	// spins counts the waits a spin ended, the sleeps it saved (this
	// process, this ring).
	spins atomic.Uint64
	// rungAt, in the mapping, is when the producer last rang
	// dataWaiting's doorbell, in wall-clock nanoseconds, the one clock
	// both processes read alike; it shares dataWaiting's line (spin.go).
	rungAt *atomic.Int64
}

const (
	recordAlign = 16
	// skipMarker in a header's length field means "the rest of the ring up to
	// its end is unused; continue at offset 0".
	skipMarker = ^uint32(0)
)

func recordSize(payload int) uint64 {
	return (uint64(frameHeaderSize) + uint64(payload) + recordAlign - 1) &^ (recordAlign - 1)
}

// send copies one frame into the ring and publishes it, sleeping while the
// ring is too full.
func (r *ring) send(typ FrameType, id uint64, payload []byte) error {
	if err := r.write(typ, id, payload); err != nil {
		return err
	}
	r.flush()
	return nil
}

// sendBatch copies frames into the ring and publishes them together: one
// store of tail and at most one doorbell for the lot, where send pays both
// per frame. A batch larger than a quarter of the ring is published in
// parts as it is written, so the consumer drains the first part while the
// producer writes the next.
func (r *ring) sendBatch(frames []Frame) error {
	for _, f := range frames {
		if err := r.write(f.Type, f.ID, f.Payload); err != nil {
			// Frames written before the failure are still delivered.
			r.flush()
			return err
		}
		if r.prodTail-r.pubTail >= r.size/4 {
			r.flush()
		}
	}
	r.flush()
	return nil
}

// write copies one frame into the ring without publishing it; flush
// publishes. waitSpace publishes whatever is pending before it sleeps, so
// a producer never waits on space that only its own unpublished records
// hold.
func (r *ring) write(typ FrameType, id uint64, payload []byte) error {
	n := recordSize(len(payload))
	if n > r.size {
		return fmt.Errorf("%w: payload %d bytes, ring %d bytes", ErrFrameTooLarge, len(payload), r.size)
	}
	if r.closed.Load() != 0 {
		return ErrClosed
	}
	off := r.prodTail & r.mask
	if left := r.size - off; n > left {
		if err := r.waitSpace(left); err != nil {
			return err
		}
		// Only the length: the space left may be a single 16-byte unit,
		// shorter than a header.
		binary.LittleEndian.PutUint32(r.data[off:], skipMarker)
		r.prodTail += left
		off = 0
	}
	if err := r.waitSpace(n); err != nil {
		return err
	}
	h := r.data[off : off+frameHeaderSize]
	putFrameHeader(h, uint32(len(payload)), typ, id)
	copy(r.data[off+frameHeaderSize:], payload)
	// The check is computed from the caller's copy, not read back from
	// shared memory.
	sealFrame(h, payload)
	r.prodTail += n
	return nil
}

// flush makes everything written so far visible to the consumer and rings
// its doorbell if it sleeps.
func (r *ring) flush() {
	if r.pubTail == r.prodTail {
		return
	}
	r.pubTail = r.prodTail
	// A Swap, not a Store: the load of dataWaiting below must not pass it
	// (see "Doorbells").
	r.tail.Swap(r.pubTail)
	// The plain load keeps the hot path free of a locked instruction when the
	// consumer is awake, which is the common case under load.
	if r.dataWaiting.Load() != 0 && r.dataWaiting.CompareAndSwap(1, 0) {
		r.wakes.Add(1)
		r.rungAt.Store(time.Now().UnixNano())
		futexWakeOne(r.dataWaiting)
	}
}

// waitSpace returns once n bytes past prodTail are free.
func (r *ring) waitSpace(n uint64) error {
	if r.size-(r.prodTail-r.prodHead) >= n {
		return nil
	}
	// The consumer can only free what it can see.
	r.flush()
	locked := false
	defer func() {
		if locked {
			runtime.UnlockOSThread()
		}
	}()
	for {
		r.prodHead = r.head.Load()
		if used := r.prodTail - r.prodHead; used > r.size {
			return fmt.Errorf("%w: head %d beyond tail %d", ErrCorrupt, r.prodHead, r.prodTail)
		}
		if r.size-(r.prodTail-r.prodHead) >= n {
			return nil
		}
		if r.closed.Load() != 0 {
			return ErrClosed
		}
		if !locked {
			runtime.LockOSThread()
			locked = true
		}
		r.spaceWaiting.Swap(1)
		if r.head.Load() != r.prodHead || r.closed.Load() != 0 {
			r.spaceWaiting.Store(0)
			continue
		}
		futexSleep(r.spaceWaiting, 1)
	}
}

// recv takes the next frame out of the ring, sleeping while it is empty. The
// payload is copied into buf's storage (grown if needed), so it stays valid
// after the space is handed back to the producer. Frames already in the ring
// are still delivered after a close; ErrClosed comes once the ring is empty.
func (r *ring) recv(buf []byte) (Frame, error) {
	f, _, err := r.next(buf[:0], true)
	return f, err
}

// recvBatch appends to frames every frame already published, up to
// cap(frames) of them, sleeping only while there is none. Payloads are
// appended one after another to buf[:0] and alias it; the batch stops early
// when the next payload would not fit in cap(buf), except for the first.
// Taking all that is there in one call lets the caller pay the segment's
// lock once per batch rather than per frame.
func (r *ring) recvBatch(frames []Frame, buf []byte) ([]Frame, error) {
	f, ok, err := r.next(buf[:0], true)
	if err != nil {
		return frames, err
	}
	// The first payload starts at offset 0 of what may be a grown buffer;
	// the later ones are appended only when they fit, so they share it.
	buf = f.Payload
	// The rest of the batch hands its space back with one store of head,
	// at the end, or sooner if a quarter of the ring is taken.
	r.batching = true
	defer func() {
		r.batching = false
		r.releaseHead()
	}()
	for ok {
		if r.consHead-r.head.Load() >= r.size/4 {
			r.releaseHead()
		}
		f.Payload = f.Payload[:len(f.Payload):len(f.Payload)]
		frames = append(frames, f)
		if len(frames) == cap(frames) {
			break
		}
		f, ok, err = r.next(buf, false)
		if err != nil {
			// The frames before the bad record are sound; the error comes
			// again on the next call.
			return frames, nil
		}
		buf = buf[:len(buf)+len(f.Payload)]
	}
	return frames, nil
}

// next takes the next frame, appending its payload to dst. With wait it
// sleeps until there is one; without, it reports ok false at once when the
// ring is empty or the next payload would not fit in cap(dst).
func (r *ring) next(dst []byte, wait bool) (f Frame, ok bool, err error) {
	for {
		if r.consTail == r.consHead {
			if !wait {
				if r.consTail = r.tail.Load(); r.consTail == r.consHead {
					return Frame{}, false, nil
				}
			} else if err := r.waitData(); err != nil {
				return Frame{}, false, err
			}
		}
		avail := r.consTail - r.consHead
		off := r.consHead & r.mask
		left := r.size - off
		if avail > r.size || avail < recordAlign || off%recordAlign != 0 {
			return Frame{}, false, fmt.Errorf("%w: %d bytes published at offset %d", ErrCorrupt, avail, off)
		}
		length := binary.LittleEndian.Uint32(r.data[off:])
		if length == skipMarker {
			if left > avail {
				return Frame{}, false, fmt.Errorf("%w: skip of %d bytes with %d published", ErrCorrupt, left, avail)
			}
			r.consume(r.consHead + left)
			continue
		}
		n := recordSize(int(length))
		if n > avail || n > left {
			return Frame{}, false, fmt.Errorf("%w: record of %d bytes at offset %d with %d published", ErrCorrupt, n, off, avail)
		}
		if !wait && uint64(len(dst))+uint64(length) > uint64(cap(dst)) {
			return Frame{}, false, nil
		}
		// The peer can still write the shared bytes, so the header and the
		// payload are copied out first and only the copies are checked and
		// used. The header goes to a field, not a local array, which the
		// checksum call would move to the heap on every frame.
		h := &r.consHeader
		copy(h[:], r.data[off:off+frameHeaderSize])
		if binary.LittleEndian.Uint32(h[:]) != length {
			return Frame{}, false, fmt.Errorf("%w: record at offset %d changed while read", ErrCorrupt, off)
		}
		if err := checkFrameHeader(h[:]); err != nil {
			return Frame{}, false, fmt.Errorf("%w: at offset %d: %w", ErrCorrupt, off, err)
		}
		f = Frame{Type: FrameType(h[4]), ID: binary.LittleEndian.Uint64(h[8:])}
		start := len(dst)
		dst = append(dst, r.data[off+frameHeaderSize:off+frameHeaderSize+uint64(length)]...)
		f.Payload = dst[start:]
		if err := verifyFrame(h[:], f.Payload); err != nil {
			return Frame{}, false, fmt.Errorf("%w: at offset %d: %w", ErrCorrupt, off, err)
		}
		r.consume(r.consHead + n)
		return f, true, nil
	}
}

// consume hands the space below pos back to the producer and rings its
// doorbell if it sleeps on a full ring.
//
// A producer sleeps on a full ring only after publishing everything it has
// written, so the consumer wakes it once it has drained all it has seen, or
// earlier once a quarter of the ring has been freed since the last wake.
// Waking on every record instead would have a fast producer fill one slot,
// sleep again and cost a wake per frame.
func (r *ring) consume(pos uint64) {
	r.consHead = pos
	if r.batching {
		// recvBatch stores head once for the batch (releaseHead).
		return
	}
	r.releaseHead()
}

// releaseHead stores consHead in head and wakes a producer waiting for
// space if the rule above says so.
func (r *ring) releaseHead() {
	pos := r.consHead
	// A Swap, not a Store, for the same reason as tail's in flush.
	r.head.Swap(pos)
	if r.spaceWaiting.Load() != 0 && (pos == r.consTail || pos-r.consWoke >= r.size/4) &&
		r.spaceWaiting.CompareAndSwap(1, 0) {
		r.consWoke = pos
		r.wakes.Add(1)
		futexWakeOne(r.spaceWaiting)
	}
}

// waitData returns once the producer has published past consHead. While
// recent waits were short it spins before it sleeps (spin.go), and it
// records how long this wait lasted for the next one.
func (r *ring) waitData() error {
	if r.consTail = r.tail.Load(); r.consTail != r.consHead {
		return nil // no wait at all: nothing to record
	}
	start := time.Now()
	budget := r.waits.budget()
	if budget > 0 && r.spin(start, budget) {
		waited := time.Since(start)
		if waited > budget/2 {
			waited = spinLimit // scored as a miss (spin.go)
		}
		r.waits.record(waited)
		r.spins.Add(1)
		return nil
	}
	err := r.sleepData()
	// The wait the data took, not the sleep's own wake-up on top: when
	// the producer rang this sleep's doorbell, the time it rang.
	waited := time.Since(start)
	if rung := r.rungAt.Load() - start.UnixNano(); rung >= 0 && rung < int64(waited) {
		waited = time.Duration(rung)
	}
	if budget > 0 {
		// A spin that missed counts at least as a full spin.
		waited = max(waited, spinLimit)
	}
	r.waits.record(waited)
	return err
}

// sleepData is waitData's sleep on the doorbell.
func (r *ring) sleepData() error {
	locked := false
	defer func() {
		if locked {
			runtime.UnlockOSThread()
		}
	}()
	yielded := false
	for {
		r.consTail = r.tail.Load()
		if r.consTail != r.consHead {
			return nil
		}
		if r.closed.Load() != 0 {
			return ErrClosed
		}
		if !yielded {
			// Yield once before sleeping. What this goroutine just handed
			// on (a call's events, a worker's inbox) readied its consumer
			// on this thread's P, and the futex sleep below keeps that P
			// until the runtime's monitor takes it back: the consumer would
			// wait for another thread to be woken to steal it. Yielding
			// runs it here first, without waiting for a thread to wake
			// (docs/BENCHMARKS.md, "Where the time to first token went").
			yielded = true
			runtime.Gosched()
			continue
		}
		if !locked {
			runtime.LockOSThread()
			locked = true
		}
		r.dataWaiting.Swap(1)
		if r.tail.Load() != r.consHead || r.closed.Load() != 0 {
			r.dataWaiting.Store(0)
			continue
		}
		futexSleep(r.dataWaiting, 1)
	}
}

// wakeAll clears both doorbells and wakes whoever sleeps on them; the caller
// has set the closed flag first.
func (r *ring) wakeAll() {
	r.dataWaiting.Store(0)
	futexWakeAll(r.dataWaiting)
	r.spaceWaiting.Store(0)
	futexWakeAll(r.spaceWaiting)
}
