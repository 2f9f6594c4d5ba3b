package upstream

import (
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"h3infer/infer"
)

// A request for several choices fails at once, naming n, before anything
// goes upstream: the call reads an upstream's stream as one choice's, so
// sent on, the choices would run together. The upstream stays in service.
func TestChoicesRefused(t *testing.T) {
	f, url := newFake(t)
	s, _ := newTestSet(t, Options{}, testConfig("a", url))
	var received atomic.Int64
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		received.Add(1)
		streamTokens("x")(w, r)
	})
	req := chatRequest("m")
	req.N = 3
	evs := run(t, s, req)
	if len(evs) != 1 || evs[0].Err == nil || evs[0].Err.Code != infer.CodeInvalidRequest ||
		!strings.HasPrefix(evs[0].Err.Message, "n: ") || evs[0].Err.Unstarted {
		t.Errorf("n 3: events %+v, want only an invalid_request naming n", evs)
	}
	if n := received.Load(); n != 0 {
		t.Errorf("the upstream received %d requests, want none", n)
	}
	req.N = 1
	if d := last(t, run(t, s, req)).Done; d == nil || received.Load() != 1 {
		t.Errorf("n 1: done %+v after %d requests upstream, want it served", d, received.Load())
	}
}
