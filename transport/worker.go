//go:build linux

package transport

import (
	"fmt"
	"sync"

	"h3infer/infer"
)

// WorkerEnd is the worker process's side of a Segment: it receives submits
// and cancels, and sends tokens, results and reports.
//
// The worker does not notice on its own that the gateway process died; start
// it with SysProcAttr.Pdeathsig set so the kernel ends it with its parent.
type WorkerEnd struct {
	seg *Segment

	recvMu  sync.Mutex
	recvBuf []byte

	sendMu     sync.Mutex // the response ring has one producer at a time
	sendBuf    []byte
	sendFrames []Frame // SendTokens' batch, reused
}

// NewWorkerEnd makes the worker's endpoint on seg.
func NewWorkerEnd(seg *Segment) *WorkerEnd {
	return &WorkerEnd{
		seg:     seg,
		recvBuf: make([]byte, 0, 4096),
		sendBuf: make([]byte, 0, 512),
	}
}

// Recv returns the next frame from the gateway, sleeping while there is none.
// It returns an error wrapping ErrClosed once either side has closed and the
// ring is drained.
//
// The returned Payload is only valid until the next call to Recv, which
// reuses its storage; decode it (the Decode functions copy strings) or copy
// it before calling Recv again. Call Recv from one dedicated goroutine: while
// it sleeps it holds that goroutine's OS thread.
func (w *WorkerEnd) Recv() (Frame, error) {
	w.recvMu.Lock()
	defer w.recvMu.Unlock()
	f, err := w.seg.recv(requestRing, w.recvBuf)
	if err != nil {
		return Frame{}, fmt.Errorf("transport: worker receive: %w", err)
	}
	w.recvBuf = f.Payload[:0]
	return f, nil
}

// SendToken sends tokens for request id. It does not allocate once the
// endpoint's scratch buffer has grown to the largest token text.
func (w *WorkerEnd) SendToken(id uint64, t infer.Token) error {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	w.sendBuf = AppendToken(w.sendBuf[:0], &t)
	return w.send(FrameToken, id)
}

// TokenOut is one token for one request, an element of SendTokens' batch.
type TokenOut struct {
	ID    uint64
	Token infer.Token
}

// SendTokens sends one token frame per element, in order, and publishes
// them together: one store of the ring's tail and at most one doorbell for
// the batch, where a SendToken per element pays both every time. A decode
// step that produced a token for each of several sequences sends them this
// way. On an error the frames before the failing one may have been sent.
func (w *WorkerEnd) SendTokens(ts []TokenOut) error {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	w.sendBuf = w.sendBuf[:0]
	w.sendFrames = w.sendFrames[:0]
	for i := range ts {
		w.sendBuf = AppendToken(w.sendBuf, &ts[i].Token)
		// For now Payload only carries the end offset in its length; the
		// slices are cut once sendBuf has stopped growing.
		w.sendFrames = append(w.sendFrames, Frame{Type: FrameToken, ID: ts[i].ID, Payload: w.sendBuf[:len(w.sendBuf)]})
	}
	start := 0
	for i := range w.sendFrames {
		end := len(w.sendFrames[i].Payload)
		w.sendFrames[i].Payload = w.sendBuf[start:end:end]
		start = end
	}
	if err := w.seg.sendBatch(responseRing, w.sendFrames); err != nil {
		return fmt.Errorf("transport: worker send %d tokens: %w", len(ts), err)
	}
	return nil
}

// SendDone ends request id normally.
func (w *WorkerEnd) SendDone(id uint64, d infer.Done) error {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	w.sendBuf = AppendDone(w.sendBuf[:0], &d)
	return w.send(FrameDone, id)
}

// SendError ends request id with a failure.
func (w *WorkerEnd) SendError(id uint64, e infer.Error) error {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	w.sendBuf = AppendError(w.sendBuf[:0], &e)
	return w.send(FrameError, id)
}

// SendReady announces that the worker's models are loaded.
func (w *WorkerEnd) SendReady(r Ready) error {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	w.sendBuf = AppendReady(w.sendBuf[:0], &r)
	return w.send(FrameReady, 0)
}

// SendStats reports the worker's cumulative counters.
func (w *WorkerEnd) SendStats(s Stats) error {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	w.sendBuf = AppendStats(w.sendBuf[:0], &s)
	return w.send(FrameStats, 0)
}

// SendHeartbeat tells the gateway the worker is alive.
func (w *WorkerEnd) SendHeartbeat() error {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	return w.send(FrameHeartbeat, 0)
}

// send writes w.sendBuf as a frame; the caller holds sendMu.
func (w *WorkerEnd) send(typ FrameType, id uint64) error {
	var payload []byte
	if typ != FrameHeartbeat {
		payload = w.sendBuf
	}
	if err := w.seg.send(responseRing, typ, id, payload); err != nil {
		return fmt.Errorf("transport: worker send %s for request %d: %w", typ, id, err)
	}
	return nil
}

// Close marks the segment closed for both processes and wakes every waiter:
// a blocked Recv or send returns ErrClosed, and the gateway's receive loop
// ends its calls. It is idempotent. The segment itself stays mapped until
// Segment.Close.
func (w *WorkerEnd) Close() {
	w.seg.shut()
}
