package engine

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"h3infer/internal/onnxgen"
	"h3infer/ort"
	"h3infer/workerconf"
)

// The loop's tests drive it with the models production serves: the demo
// model through ONNX Runtime (package ort, which imports nothing of this
// package) and the synthetic model.
var _ Model = (*ort.Model)(nil)

// Set by the first test that needs them, for the whole binary: the demo
// model is written once, and ONNX Runtime can be initialized only once per
// process. Tests that need no model do not pay for it.
var (
	testSetup    sync.Once
	testDir      string
	testORTLib   string
	testModelDir string
	testSetupErr error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if testDir != "" {
		os.RemoveAll(testDir)
	}
	os.Exit(code)
}

func setupModel() error {
	dir, err := os.MkdirTemp("", "h3infer-engine-test-")
	if err != nil {
		return err
	}
	testDir = dir
	testORTLib = os.Getenv("ONNXRUNTIME_LIB")
	if testORTLib == "" {
		// What `make ort` fetches, so a bare `go test` works after it.
		testORTLib, _ = filepath.Abs("../.cache/onnxruntime/1.24.1/libonnxruntime.so.1")
	}
	if err := ort.InitRuntime(testORTLib); err != nil {
		return err
	}
	testModelDir = filepath.Join(dir, "demo")
	if err := onnxgen.Write(testModelDir, onnxgen.DefaultOptions()); err != nil {
		return fmt.Errorf("write demo model: %w", err)
	}
	return nil
}

// needModel fails the test when the runtime or the demo model is missing.
func needModel(t testing.TB) {
	t.Helper()
	testSetup.Do(func() { testSetupErr = setupModel() })
	if testSetupErr != nil {
		t.Fatalf("setup: %v", testSetupErr)
	}
}

// loadTestModel loads the demo model and closes it at the end of the test.
func loadTestModel(t testing.TB) *ort.Model {
	t.Helper()
	needModel(t)
	return loadModelDir(t, "demo", testModelDir, ort.Options{})
}

// loadModelDir loads the model in dir under name and closes it at the end
// of the test.
func loadModelDir(t testing.TB, name, dir string, o ort.Options) *ort.Model {
	t.Helper()
	needModel(t)
	o.Name = name
	m, err := ort.LoadModel(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// ortLoad loads model directories with ONNX Runtime, as cmd/h3infer's
// worker does.
func ortLoad(s workerconf.Settings, log *slog.Logger) func(workerconf.Model) (Model, error) {
	return func(spec workerconf.Model) (Model, error) {
		m, err := ort.Open(s, spec, log)
		if err != nil {
			return nil, err
		}
		return m, nil
	}
}

// testLogger sends log records to the test's log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}
