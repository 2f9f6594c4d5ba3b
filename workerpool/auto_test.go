package workerpool_test

import (
	"context"
	"os"
	"testing"
	"time"

	"h3infer/workerconf"
	"h3infer/workerpool"
)

// The worker count follows the CPUs over each worker's intra-op threads,
// within 1..MaxAutoWorkers, and is 1 where a model asks for a GPU.
func TestAutoWorkers(t *testing.T) {
	for name, tc := range map[string]struct {
		cpus, intraOp int
		gpu           bool
		want          int
	}{
		"two cpus":            {2, 1, false, 2},
		"one cpu":             {1, 1, false, 1},
		"threads over cpus":   {2, 4, false, 1},
		"threads share cpus":  {8, 2, false, 4},
		"large machine":       {96, 1, false, workerpool.MaxAutoWorkers},
		"gpu":                 {16, 1, true, 1},
		"intra_op left unset": {3, 0, false, 3},
	} {
		t.Run(name, func(t *testing.T) {
			if got := workerpool.AutoWorkers(tc.cpus, tc.intraOp, tc.gpu); got != tc.want {
				t.Errorf("AutoWorkers(%d, %d, %v) = %d, want %d", tc.cpus, tc.intraOp, tc.gpu, got, tc.want)
			}
		})
	}
}

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
