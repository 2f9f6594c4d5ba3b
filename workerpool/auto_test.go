package workerpool_test

import (
	"context"
	"os"
	"testing"
	"time"

	"h3infer/workerconf"
	"h3infer/workerpool"
)

// A worker left to derive its slots (workers.slots 0) reports them in its
// Ready frame, and the pool hands them to the scheduler (Process.Slots)
// and to the admin listener (Status), with how many full-context
// sequences fit.
func TestPoolDerivesSlots(t *testing.T) {
	dir, lib := workerpool.DemoModelForTest(t)
	ref := loadReference(t, dir, "demo")
	perSeq := ref.m.KVBytes(1, int(ref.m.Info().ContextLength))
	t.Setenv(workerpool.WorkerEnvForTest, "1")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p, err := workerpool.New(workerpool.Config{
		Workers:    1,
		Executable: exe,
		Worker: workerconf.Settings{
			Models:       []workerconf.Model{{Name: "demo", Dir: dir}},
			ORTLib:       lib,
			KVCacheBytes: 6*perSeq + perSeq/2,
		},
	}, workerpool.LoggerForTest(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if got := p.Processes()[0].Slots(); got != 6 {
		t.Errorf("Slots() = %d, want 6", got)
	}
	if st := p.Status()[0]; st.Slots != 6 || st.SlotsFit != 6 {
		t.Errorf("Status: slots %d, slots_fit %d; want 6, 6", st.Slots, st.SlotsFit)
	}
}
