// Package demoenv prepares, once per test binary, what the tests of the
// worker's packages share: ONNX Runtime initialised from the library
// `make ort` fetched (or ONNXRUNTIME_LIB), and the demo model written into
// a temporary directory. Only tests import it.
//
// It imports nothing that links ONNX Runtime: the caller says how to
// initialise the runtime, so that package ort's own tests can use it.
package demoenv

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"h3infer/internal/onnxgen"
)

// Env is set up on the first Need, so that tests and fuzz workers that
// need no model do not pay for it. ONNX Runtime can be initialised only
// once per process, so a test binary holds one Env.
type Env struct {
	// Prefix names the temporary directory.
	Prefix string
	// Init initialises ONNX Runtime from the library at path.
	Init func(path string) error

	once          sync.Once
	dir, lib, mdl string
	err           error
}

// Need fails t unless the runtime is initialised and the demo model
// written, doing both on first use.
func (e *Env) Need(t testing.TB) {
	t.Helper()
	e.once.Do(func() { e.err = e.setUp() })
	if e.err != nil {
		t.Fatalf("setup: %v", e.err)
	}
}

func (e *Env) setUp() error {
	dir, err := os.MkdirTemp("", e.Prefix)
	if err != nil {
		return err
	}
	e.dir = dir
	e.lib = os.Getenv("ONNXRUNTIME_LIB")
	if e.lib == "" {
		// What `make ort` fetches, so a bare `go test` works after it.
		// Test binaries run in their package's directory, one below the
		// module's root.
		e.lib, _ = filepath.Abs("../.cache/onnxruntime/1.24.1/libonnxruntime.so.1")
	}
	if err := e.Init(e.lib); err != nil {
		return err
	}
	e.mdl = filepath.Join(dir, "demo")
	if err := onnxgen.Write(e.mdl, onnxgen.DefaultOptions()); err != nil {
		return fmt.Errorf("write demo model: %w", err)
	}
	return nil
}

// ModelDir is the demo model's directory; Lib the runtime's library. Both
// are valid after a Need.
func (e *Env) ModelDir() string { return e.mdl }
func (e *Env) Lib() string      { return e.lib }

// Remove deletes what Need wrote; TestMain calls it after the tests.
func (e *Env) Remove() {
	if e.dir != "" {
		os.RemoveAll(e.dir)
	}
}
