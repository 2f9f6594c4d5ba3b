//go:build linux

package transport

import "h3infer/infer"

// SendEmbedding sends vectors of embedding request id; several may go
// before the request's FrameDone.
func (w *WorkerEnd) SendEmbedding(id uint64, e infer.Embedding) error {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	w.sendBuf = AppendEmbedding(w.sendBuf[:0], &e)
	return w.send(FrameEmbedding, id)
}
