package workerpool_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"h3infer/workerconf"
	"h3infer/workerpool"
)

// A worker process whose model asks for auto on a host without CUDA comes
// up on the CPU, and the pool exports no GPU memory for it: an absent
// metric, not a zero that reads as "a GPU with nothing on it".
func TestPoolAutoProviderWithoutGPU(t *testing.T) {
	dir, lib := workerpool.DemoModelForTest(t)
	t.Setenv(workerpool.WorkerEnvForTest, "1")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	p, err := workerpool.New(workerpool.Config{
		Workers:    1,
		Executable: exe,
		Worker: workerconf.Settings{
			Models:         []workerconf.Model{{Name: "demo", Dir: dir, Provider: workerconf.ProviderAuto}},
			ORTLib:         lib,
			GPUMemoryBytes: 1 << 30,
		},
		Registerer: reg,
	}, workerpool.LoggerForTest(t))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "worker ready", p.Ready)
	if got := metric(t, reg, "h3infer_worker_ready", "0"); got != 1 {
		t.Errorf("h3infer_worker_ready = %v, want 1", got)
	}
	if workerpool.GPUMemoryErrorForTest() == nil {
		// A host with an NVIDIA driver (and, docs/GPU.md, the CUDA
		// libraries): auto lands on the GPU and the worker holds memory.
		if got := metric(t, reg, "h3infer_worker_gpu_memory_bytes", "0"); got <= 0 {
			t.Errorf("h3infer_worker_gpu_memory_bytes = %v, want > 0", got)
		}
		return
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == "h3infer_worker_gpu_memory_bytes" {
			t.Errorf("gpu memory metric exported on a host without a GPU: %v", f)
		}
	}
}

// Without an NVIDIA driver, the reason NVML is off names the library.
func TestGPUMemoryNamesLibrary(t *testing.T) {
	err := workerpool.GPUMemoryErrorForTest()
	if err != nil && !strings.Contains(err.Error(), "libnvidia-ml.so.1") {
		t.Errorf("got %v, want it to name libnvidia-ml.so.1", err)
	}
}
