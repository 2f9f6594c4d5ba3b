//go:build linux

package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
	"unsafe"

	"h3infer/infer"
)

// fuzzRingSize is the ring the fuzz target reads: the smallest allowed, so
// that the fuzzer's inputs cover a good part of it.
const fuzzRingSize = MinRingSize

// hostileRing is a response ring whose shared memory says what the fuzzer
// wrote: data as the ring's bytes and head and tail as its published
// indices, as a worker process could leave them. The memory is a segment's
// layout in process memory; nothing else maps it.
func hostileRing(data []byte, head, tail uint64) *ring {
	// uint64 words keep the atomics 8-byte aligned.
	words := make([]uint64, (headerSize+2*fuzzRingSize)/8)
	mem := unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), len(words)*8)
	s := newSegment(nil, mem, fuzzRingSize)
	r := &s.rings[responseRing]
	copy(r.data, data)
	r.head.Store(head)
	r.tail.Store(tail)
	r.consHead, r.consTail = head, head
	// Closed, so that a reader that has taken all that is published ends
	// with ErrClosed instead of sleeping for more.
	r.closed.Store(1)
	return r
}

// FuzzRingRecv feeds arbitrary ring contents and indices to the gateway's
// reader of the response ring. Whatever the worker wrote, the reader must
// return frames that are whole and checked, or ErrCorrupt; it must not
// panic, read outside the ring, move its cursor past the published tail,
// or loop. Seeds: a few well-formed rings below and
// testdata/fuzz/FuzzRingRecv (hostile indices and lengths).
func FuzzRingRecv(f *testing.F) {
	for _, seed := range ringSeeds() {
		f.Add(seed.data, seed.head, seed.tail)
	}
	f.Fuzz(func(t *testing.T, data []byte, head, tail uint64) {
		r := hostileRing(data, head, tail)
		// Each good record is at least recordAlign bytes, so a reader that
		// takes more frames than this has been fooled into a loop.
		limit := fuzzRingSize/recordAlign + 1
		batch := make([]Frame, 0, 8)
		for i := 0; ; i++ {
			if i > limit {
				t.Fatalf("read more than %d frames from a %d-byte ring", limit, fuzzRingSize)
			}
			var frames []Frame
			var err error
			if i%2 == 0 {
				var fr Frame
				var ok bool
				fr, ok, err = r.next(make([]byte, 0, fuzzRingSize), false)
				if ok {
					frames = append(frames, fr)
				} else if err == nil {
					return // nothing more published
				}
			} else {
				if r.tail.Load() == r.consHead {
					return // recvBatch would sleep for more
				}
				frames, err = r.recvBatch(batch[:0], make([]byte, 0, 64))
				if err == nil && len(frames) == 0 {
					t.Fatal("recvBatch returned no frame and no error")
				}
			}
			if err != nil {
				if errors.Is(err, ErrClosed) {
					return // nothing more published
				}
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("got %v, want nil, ErrCorrupt or ErrClosed", err)
				}
				return
			}
			if r.consHead-head > tail-head {
				t.Fatalf("reader at %d, past the published tail %d (head %d)", r.consHead, tail, head)
			}
			for _, fr := range frames {
				checkRingFrame(t, fr)
			}
		}
	})
}

// checkRingFrame holds a frame the reader accepted to the frame format: a
// known type and a payload that fits the ring and re-encodes to a record
// that DecodeFrame accepts with the same contents.
func checkRingFrame(t *testing.T, fr Frame) {
	t.Helper()
	if fr.Type == 0 || fr.Type > maxFrameType {
		t.Fatalf("accepted a frame of type %d", fr.Type)
	}
	if recordSize(len(fr.Payload)) > fuzzRingSize {
		t.Fatalf("accepted a %d-byte payload from a %d-byte ring", len(fr.Payload), fuzzRingSize)
	}
	b, err := AppendFrame(nil, fr)
	if err != nil {
		t.Fatal(err)
	}
	back, _, err := DecodeFrame(b)
	if err != nil || back.Type != fr.Type || back.ID != fr.ID || !bytes.Equal(back.Payload, fr.Payload) {
		t.Fatalf("accepted frame %v %d %x does not re-encode (%v)", fr.Type, fr.ID, fr.Payload, err)
	}
}

type ringSeed struct {
	data       []byte
	head, tail uint64
}

// ringSeeds are rings a real producer left: frames, a wrap with a skip
// marker, and indices far along their 64-bit range.
func ringSeeds() []ringSeed {
	gw, err := NewSegment(fuzzRingSize)
	if err != nil {
		panic(err)
	}
	defer gw.Close()
	r := &gw.rings[responseRing]
	snapshot := func() ringSeed {
		return ringSeed{data: bytes.Clone(r.data), head: r.head.Load(), tail: r.tail.Load()}
	}
	var seeds []ringSeed
	tok := AppendToken(nil, &infer.Token{Count: 1, Text: "hello"})
	if err := r.sendBatch([]Frame{
		{Type: FrameReady, Payload: AppendReady(nil, &Ready{PID: 1, Slots: 2, Models: []infer.ModelInfo{{Name: "demo", ContextLength: 64}}})},
		{Type: FrameToken, ID: 7, Payload: tok},
		{Type: FrameDone, ID: 7, Payload: AppendDone(nil, &infer.Done{FinishReason: infer.FinishStop, CompletionTokens: 1})},
		{Type: FrameHeartbeat},
	}); err != nil {
		panic(err)
	}
	seeds = append(seeds, snapshot())
	// Consume most of the ring, then write across its end.
	for r.tail.Load() < fuzzRingSize-fuzzRingSize/8 {
		if err := r.send(FrameToken, 8, tok); err != nil {
			panic(err)
		}
		r.head.Store(r.tail.Load())
	}
	for range 3 {
		if err := r.send(FrameStats, 0, make([]byte, fuzzRingSize/4)); err != nil {
			panic(err)
		}
	}
	seeds = append(seeds, snapshot())
	// A skip marker where the 64-bit indices wrap.
	far := ringSeed{data: make([]byte, fuzzRingSize), head: 1<<64 - 32, tail: 0}
	binary.LittleEndian.PutUint32(far.data[fuzzRingSize-32:], skipMarker)
	seeds = append(seeds, far)
	// A record, then a skip marker that ends what is published: the reader
	// takes the record, skips to the next lap and finds nothing there.
	gw2, err := NewSegment(fuzzRingSize)
	if err != nil {
		panic(err)
	}
	defer gw2.Close()
	r = &gw2.rings[responseRing]
	for r.tail.Load() < fuzzRingSize-fuzzRingSize/8 {
		if err := r.send(FrameToken, 8, tok); err != nil {
			panic(err)
		}
		r.head.Store(r.tail.Load())
	}
	before := r.tail.Load()
	if err := r.send(FrameToken, 9, tok); err != nil {
		panic(err)
	}
	// Too long for what is left of the lap: a skip marker, then the record
	// on the next lap, which the seed leaves unpublished.
	if err := r.send(FrameStats, 0, make([]byte, fuzzRingSize/4)); err != nil {
		panic(err)
	}
	last := snapshot()
	last.head, last.tail = before, fuzzRingSize
	return append(seeds, last)
}
