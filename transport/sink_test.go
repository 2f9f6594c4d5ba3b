package transport

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"

	"h3infer/infer"
)

// A ring that shuts while calls are being opened into sinks hands each
// call's loss to exactly one party: either OpenSink fails (and Divert
// never saw the error) or OpenSink returns the call and its loss went to
// Divert or to the channel. Both at once had the scheduler re-dispatch a
// request it had also given up on, and send on the channel it had closed
// (34 of 8,000 opens at -cpu 2,4,8 before the fix).
func TestOpenSinkRacingCloseEndsOnce(t *testing.T) {
	both, opens := 0, 0
	for range 1000 {
		gwSeg, _ := newPair(t, 64<<10)
		g := NewGatewayEnd(gwSeg, GatewayEndConfig{})
		runErr := make(chan error, 1)
		go func() { runErr <- g.Run() }()
		const openers = 8
		var diverted [openers]atomic.Bool
		var errs [openers]error
		var wg sync.WaitGroup
		for i := range openers {
			sink := &infer.Sink{Divert: func(*infer.Error) bool { diverted[i].Store(true); return true }}
			wg.Go(func() { _, errs[i] = g.OpenSink(uint64(i+1), &infer.Request{Model: "m", Prompt: "p"}, sink) })
		}
		wg.Go(func() { g.Close() })
		wg.Wait()
		if e := <-runErr; e != nil && !errors.Is(e, ErrClosed) {
			t.Fatal(e)
		}
		for i := range openers {
			opens++
			if errs[i] != nil && diverted[i].Load() {
				both++
			}
		}
	}
	if both > 0 {
		t.Errorf("%d of %d opens both failed and diverted the loss", both, opens)
	}
}
