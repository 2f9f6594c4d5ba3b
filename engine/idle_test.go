package engine

import (
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/transport"
)

// TestIdleWorkerSendsNoStats: an idle worker whose counters have not
// changed sends no stats frames, which would wake the gateway's ring
// reader every interval; once a request has run, the changed counters go
// out.
func TestIdleWorkerSendsNoStats(t *testing.T) {
	rw := startRingWorker(t, 2)
	reports := func() int {
		rw.mu.Lock()
		defer rw.mu.Unlock()
		return rw.reports
	}
	time.Sleep(50 * time.Millisecond) // ten intervals: the first report, if any, is out
	before := reports()
	time.Sleep(200 * time.Millisecond) // forty intervals
	if got := reports() - before; got != 0 {
		t.Errorf("idle worker sent %d stats frames in 40 intervals with unchanged counters, want 0", got)
	}
	c, err := rw.end.Open(1, &infer.Request{Model: "demo", Prompt: "x", MaxTokens: 2})
	if err != nil {
		t.Fatal(err)
	}
	for range c.Events() {
	}
	rw.waitStats(t, func(s transport.Stats) bool { return s.SequencesFinished == 1 && s.Active == 0 })
}
