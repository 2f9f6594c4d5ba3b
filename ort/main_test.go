package ort

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"h3infer/internal/onnxgen"
)

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
	dir, err := os.MkdirTemp("", "h3infer-ort-test-")
	if err != nil {
		return err
	}
	testDir = dir
	testORTLib = os.Getenv("ONNXRUNTIME_LIB")
	if testORTLib == "" {
		// What `make ort` fetches, so a bare `go test` works after it.
		testORTLib, _ = filepath.Abs("../.cache/onnxruntime/1.24.1/libonnxruntime.so.1")
	}
	if err := InitRuntime(testORTLib); err != nil {
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
func loadTestModel(t testing.TB) *Model {
	t.Helper()
	needModel(t)
	m, err := LoadModel(testModelDir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// loadRandomModel writes a small random-weight model into the test's
// temporary directory. Its attention is diffuse, unlike the demo model's,
// so a padding column that leaks into attention shows in the logits.
func loadRandomModel(t testing.TB, o onnxgen.Options) *Model {
	t.Helper()
	needModel(t)
	m, err := LoadModel(randomModelDir(t, o), Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
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
