package workerpool

import (
	"fmt"

	"h3infer/infer"
)

// OpenSink is Open with the call delivering into sink (infer.Sink) when
// it is not nil: the scheduler hands a request's consumer the worker
// ring's events with no goroutine between them.
func (w *Process) OpenSink(id uint64, s *infer.Request, sink *infer.Sink) (infer.Call, error) {
	w.mu.Lock()
	end, ready := w.end, w.ready
	w.mu.Unlock()
	if !ready || end == nil {
		return nil, fmt.Errorf("worker %d: open request %d: %w", w.id, id, ErrNotReady)
	}
	call, err := end.OpenSink(id, s, sink)
	if err != nil {
		return nil, fmt.Errorf("worker %d: %w", w.id, err)
	}
	return call, nil
}
