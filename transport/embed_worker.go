//go:build linux

package transport

import (
	"fmt"

	"h3infer/infer"
)

// SendEmbedding sends vectors of embedding request id; several may go
// before the request's FrameDone.
func (w *WorkerEnd) SendEmbedding(id uint64, e infer.Embedding) error {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	w.sendBuf = AppendEmbedding(w.sendBuf[:0], &e)
	return w.send(FrameEmbedding, id)
}

// EmbeddingOut is one request's vectors of a run, an element of
// SendEmbeddings' batch, and its Done when they are its last.
type EmbeddingOut struct {
	ID        uint64
	Embedding infer.Embedding
	Done      *infer.Done
}

// SendEmbeddings sends a FrameEmbedding per element, each followed by a
// FrameDone when the element has one, and publishes them together, as
// SendTokens does a decode step's tokens: a run of an encoder answers
// many requests at once, and a publish (and doorbell) each cost the run
// more than the frames. On an error the frames before the failing one
// may have been sent.
func (w *WorkerEnd) SendEmbeddings(outs []EmbeddingOut) error {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	w.sendBuf = w.sendBuf[:0]
	w.sendFrames = w.sendFrames[:0]
	// Payloads hold only their end offsets until sendBuf stops growing.
	for i := range outs {
		w.sendBuf = AppendEmbedding(w.sendBuf, &outs[i].Embedding)
		w.sendFrames = append(w.sendFrames, Frame{Type: FrameEmbedding, ID: outs[i].ID, Payload: w.sendBuf})
		if d := outs[i].Done; d != nil {
			w.sendBuf = AppendDone(w.sendBuf, d)
			w.sendFrames = append(w.sendFrames, Frame{Type: FrameDone, ID: outs[i].ID, Payload: w.sendBuf})
		}
	}
	start := 0
	for i := range w.sendFrames {
		end := len(w.sendFrames[i].Payload)
		w.sendFrames[i].Payload = w.sendBuf[start:end:end]
		start = end
	}
	if err := w.seg.sendBatch(responseRing, w.sendFrames); err != nil {
		return fmt.Errorf("transport: worker send %d embedding frames: %w", len(w.sendFrames), err)
	}
	return nil
}
