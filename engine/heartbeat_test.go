package engine

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"h3infer/internal/onnxgen"
	"h3infer/transport"
	"h3infer/workerconf"
)

// TestLoopBeatsWhileIdleAndLoading: the pool kills a worker whose heartbeat
// stands still, so the generation loop must beat with nothing to do, and
// must keep beating while a new model version is built and warmed up
// beside it (control.go), however long that takes.
func TestLoopBeatsWhileIdleAndLoading(t *testing.T) {
	w, rec, inbox := testLoop(t, 2, workerconf.DefaultKVCacheBytes)
	stop := make(chan struct{})
	w.inbox, w.stop = inbox, stop
	w.open = ortLoad(workerconf.Settings{ORTLib: demo.Lib()}, testLogger(t))
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- w.serve(ctx, inbox, make(chan error), 10*time.Millisecond) }()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
		close(stop)
		w.loaders.Wait()
	}()

	waitBeats := func(what string, from uint64, n uint64) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for rec.beats.Load() < from+n {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d beats in 10s, want %d", what, rec.beats.Load()-from, n)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitBeats("idle", 0, 5)

	// A version whose golden check generates hundreds of tokens: loading
	// it takes far longer than a few stats intervals.
	dir := filepath.Join(t.TempDir(), "demo2")
	if err := onnxgen.Write(dir, onnxgen.DefaultOptions()); err != nil {
		t.Fatal(err)
	}
	golden := `{"prompt": "The ", "expect": "", "max_tokens": 600}`
	if err := os.WriteFile(filepath.Join(dir, goldenFile), []byte(golden), 0o644); err != nil {
		t.Fatal(err)
	}
	const id = 77
	before := rec.beats.Load()
	inbox <- inbound{typ: transport.FrameControl, id: id, control: transport.Control{Op: transport.ControlLoad, Name: "demo@2", Dir: dir}}
	var during uint64
	deadline := time.Now().Add(2 * time.Minute)
	for {
		rec.mu.Lock()
		d, done := rec.done[id]
		e, failed := rec.errs[id]
		rec.mu.Unlock()
		if failed {
			t.Fatalf("load failed: %+v", e)
		}
		if done {
			if d.FinishReason != transport.FinishOK {
				t.Fatalf("load answered %+v", d)
			}
			break
		}
		during = rec.beats.Load() - before
		if time.Now().After(deadline) {
			t.Fatal("model not loaded within 2m")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if during < 3 {
		t.Errorf("the loop beat %d times while the model loaded, want it to keep beating", during)
	}
}
