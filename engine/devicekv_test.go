package engine

import (
	"testing"

	"h3infer/infer"
	"h3infer/internal/onnxgen"
	"h3infer/ort"
	"h3infer/workerconf"
)

// runSubmits drives a worker loop over m with subs, some arriving while
// others run, and returns each request's text and done frame.
func runSubmits(t *testing.T, m Model, subs []infer.Request) ([]string, []infer.Done, int) {
	t.Helper()
	rec := newRecorder()
	w := newWorkerLoop(rec, len(subs), workerconf.DefaultKVCacheBytes, map[string]Model{"demo": m}, testLogger(t))
	defer w.closeAll()
	inbox := make(chan inbound, 64)
	for i := range 3 {
		inbox <- submit(uint64(i), subs[i])
	}
	widest := 0
	for i := 3; i < len(subs); i++ {
		for range 5 {
			if err := w.round(inbox); err != nil {
				t.Fatal(err)
			}
			widest = max(widest, len(w.batches[0].rows))
		}
		inbox <- submit(uint64(i), subs[i])
	}
	runUntilIdle(t, w, inbox, 2000)
	texts := make([]string, len(subs))
	dones := make([]infer.Done, len(subs))
	for i := range subs {
		if e, ok := rec.errs[uint64(i)]; ok {
			t.Fatalf("request %d: error %+v", i, e)
		}
		texts[i], dones[i] = rec.textOf(uint64(i)), rec.done[uint64(i)]
	}
	if b := w.batches[0]; len(b.rows) != 0 {
		t.Errorf("idle batch still holds %d rows", len(b.rows))
	}
	return texts, dones, widest
}

// ort's IO-binding path, with the KV cache fed back from the runtime's own
// output values between steps, generates exactly the tokens of the host
// path through the loop, with joins and leaves that move the cache to the
// host and back (ort's TestDeviceKVIdleBatchHoldsNothing checks that none
// of it stays on the device). On this machine the "device" is host memory;
// under CUDA only the memory info differs.
func TestDeviceKVMatchesHost(t *testing.T) {
	needModel(t)
	on := true
	for name, dir := range map[string]string{"demo": demo.ModelDir(), "random": randomModelDir(t, onnxgen.Options{Layers: 2, Heads: 4, Hidden: 64, Context: 512, Seed: 3})} {
		t.Run(name, func(t *testing.T) {
			host := loadModelDir(t, "demo", dir, ort.Options{})
			bound := loadModelDir(t, "demo", dir, ort.Options{ORTLib: demo.Lib(), DeviceKV: &on})
			if host.DeviceKV() || !bound.DeviceKV() {
				t.Fatalf("DeviceKV: host %v, bound %v", host.DeviceKV(), bound.DeviceKV())
			}
			subs := batchSubmits()
			want, wantDone, _ := runSubmits(t, host, subs)
			got, gotDone, widest := runSubmits(t, bound, subs)
			if widest < 3 {
				t.Errorf("batch reached %d rows, want requests to overlap", widest)
			}
			for i := range subs {
				if got[i] != want[i] || gotDone[i] != wantDone[i] {
					t.Errorf("request %d:\nbound %q %+v\nhost  %q %+v", i, got[i], gotDone[i], want[i], wantDone[i])
				}
				if wantDone[i].CompletionTokens < 10 {
					t.Errorf("request %d made only %d tokens; the comparison needs long generations", i, wantDone[i].CompletionTokens)
				}
			}
		})
	}
}

func randomModelDir(t testing.TB, o onnxgen.Options) string {
	t.Helper()
	dir := t.TempDir()
	o.Random = true
	if err := onnxgen.Write(dir, o); err != nil {
		t.Fatal(err)
	}
	return dir
}
