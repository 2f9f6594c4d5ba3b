package workerpool_test

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/workerpool"
)

// TestPoolDropsHostileWorker: a worker process that writes garbage into
// its response ring, each case a different kind, is dropped by the
// gateway-side pool. The request it held ends with an explicit worker_lost
// error (never a silent end or a hang), the hostile process is killed and
// reaped, a fresh process takes its place and serves the next request, and
// nothing in this process, which plays the gateway, panics.
//
// The hostile worker is this test binary re-executed by the real Pool on
// the real ring; only the first process of each case claims the hostile
// mode (HostileOnceEnvForTest), so the replacement is a normal worker.
func TestPoolDropsHostileWorker(t *testing.T) {
	tests := map[string]struct {
		mode   string
		metric string // the pool's count of why it killed the worker
		exit   string // in the slot's LastExit
	}{
		"length past the end of the ring": {mode: workerpool.HostilePastEndForTest, metric: "h3infer_worker_ring_failures_total", exit: "ring corrupt"},
		"bad checksum":                    {mode: workerpool.HostileBadCheckForTest, metric: "h3infer_worker_ring_failures_total", exit: "checksum"},
		"unknown request id":              {mode: workerpool.HostileUnknownIDForTest, metric: "h3infer_worker_ring_failures_total", exit: "broke the protocol"},
		"flood of frames":                 {mode: workerpool.HostileFloodForTest, metric: "h3infer_worker_hangs_total", exit: "heartbeat stalled"},
	}
	dir, lib := workerpool.DemoModelForTest(t)
	t.Setenv(workerpool.WorkerEnvForTest, "1")
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			claim := filepath.Join(t.TempDir(), "hostile")
			if err := os.WriteFile(claim, []byte(tt.mode), 0o600); err != nil {
				t.Fatal(err)
			}
			t.Setenv(workerpool.HostileOnceEnvForTest, claim)
			goroutines := runtime.NumGoroutine()
			p, reg := startTestBinaryPool(t, dir, lib, 500*time.Millisecond)
			closed := false
			defer func() {
				if !closed {
					p.Close()
				}
			}()
			w := p.Processes()[0]
			waitFor(t, "the hostile worker to be ready", w.Ready)
			hostilePID := w.PID()

			c, err := w.Open(1, &infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 8})
			if err != nil {
				t.Fatal(err)
			}
			got := drain(t, c)
			if got.text != "hostile " || got.done != nil || got.err == nil || got.err.Code != infer.CodeWorkerLost {
				t.Errorf("call on the hostile worker: got text %q, done %+v, error %+v; want its one token, then a worker_lost error", got.text, got.done, got.err)
			}
			if _, err := os.Stat(claim); !os.IsNotExist(err) {
				t.Fatalf("the hostile mode was not claimed (%v): the worker was not the hostile one", err)
			}

			waitFor(t, "a fresh worker process", func() bool { pid := w.PID(); return pid != 0 && pid != hostilePID && w.Ready() })
			if n := metric(t, reg, tt.metric, "0"); n != 1 {
				t.Errorf("%s = %v, want 1", tt.metric, n)
			}
			if st := p.Status()[0]; !strings.Contains(st.LastExit, tt.exit) || st.Restarts != 1 {
				t.Errorf("status %+v: want one restart and a last exit mentioning %q", st, tt.exit)
			}
			// Reaped, not a zombie: signal 0 finds no process.
			if processAlive(hostilePID) {
				t.Errorf("hostile worker %d was not reaped", hostilePID)
			}

			c2, err := w.Open(2, &infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 5})
			if err != nil {
				t.Fatal(err)
			}
			if r := drain(t, c2); r.done == nil || r.err != nil || r.done.CompletionTokens == 0 {
				t.Errorf("request on the fresh worker: got %+v, want a completion", r)
			}

			if err := p.Close(); err != nil {
				t.Fatal(err)
			}
			closed = true
			waitFor(t, "the pool's goroutines to end", func() bool { return runtime.NumGoroutine() <= goroutines })
		})
	}
}
