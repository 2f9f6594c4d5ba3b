package loadgen

import (
	"os"
	"os/exec"
	"testing"
	"time"
)

// TestProcessCPUCountsChildren: a process's CPU time as ProcessCPU reads
// it grows with the work of a child it runs, as a gateway's does with its
// workers', and a process that does not exist is an error.
func TestProcessCPUCountsChildren(t *testing.T) {
	before, err := ProcessCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// A child that spins for about 300 ms of CPU and then waits to be
	// killed, so that it is still a live child when it is read.
	cmd := exec.Command("sh", "-c", `end=$(( $(date +%s%N) + 300000000 )); while [ "$(date +%s%N)" -lt $end ]; do :; done; sleep 60`)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	var after time.Duration
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if after, err = ProcessCPU(os.Getpid()); err != nil {
			t.Fatal(err)
		}
		if after-before >= 100*time.Millisecond {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if after-before < 100*time.Millisecond {
		t.Errorf("CPU time grew by %v while a child spun, want at least 100ms", after-before)
	}
	if _, err := ProcessCPU(1 << 30); err == nil {
		t.Error("no error for a process that does not exist")
	}
}
