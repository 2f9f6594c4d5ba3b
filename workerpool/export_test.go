package workerpool

import (
	"log/slog"
	"testing"
)

// PID is the pid of the worker's running process, 0 if none, so that
// tests can kill it.
func (w *Process) PID() int { return w.currentPID() }

// WorkerEnvForTest is the variable that makes this test binary act as a
// worker process when the Pool re-executes it.
const WorkerEnvForTest = testWorkerEnv

// DemoModelForTest returns the demo model written for this test binary and
// the ONNX Runtime library, with the runtime initialized in this process.
func DemoModelForTest(t testing.TB) (dir, ortLib string) {
	t.Helper()
	needModel(t)
	return demo.ModelDir(), demo.Lib()
}

// LoggerForTest logs warnings and errors to t.
func LoggerForTest(t testing.TB) *slog.Logger { return testLogger(t) }

// GPUMemoryErrorForTest is the error opening NVML gives on this host.
func GPUMemoryErrorForTest() error {
	_, err := openGPUMemory()
	return err
}

// MisbehaveEnvForTest makes the test worker process misbehave; see
// testMisbehaveEnv.
const MisbehaveEnvForTest = testMisbehaveEnv

// HostileOnceEnvForTest names the file that makes the first test worker
// process to claim it hostile; see testHostileOnceEnv.
const HostileOnceEnvForTest = testHostileOnceEnv

// Hostile modes of the test worker process.
const (
	HostilePastEndForTest   = hostilePastEnd
	HostileBadCheckForTest  = hostileBadCheck
	HostileUnknownIDForTest = hostileUnknownID
	HostileFloodForTest     = hostileFlood
)
