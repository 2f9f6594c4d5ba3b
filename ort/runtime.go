package ort

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	onnxrt "github.com/yalue/onnxruntime_go"
)

// InitRuntime loads the ONNX Runtime shared library at libPath and creates
// the runtime environment. Call it once per process, before LoadModel and
// before starting goroutines that use models: onnxruntime_go keeps the
// library handle and environment in its own package state, which this
// package cannot scope any tighter. A later call after a successful one is
// a no-op and ignores libPath.
func InitRuntime(libPath string) error {
	if onnxrt.IsInitialized() {
		return nil
	}
	abs, err := runtimeLibrary(libPath)
	if err != nil {
		return err
	}
	onnxrt.SetSharedLibraryPath(abs)
	if err := onnxrt.InitializeEnvironment(onnxrt.WithLogLevelError()); err != nil {
		return fmt.Errorf("onnxruntime: initialize with %s (ONNXRUNTIME_LIB sets the library path; version 1.24 or newer is needed): %w", abs, err)
	}
	return nil
}

// runtimeLibrary checks that libPath names a file and makes it absolute,
// which the runtime's dlopen needs to avoid searching the library path.
func runtimeLibrary(libPath string) (string, error) {
	if libPath == "" {
		return "", errors.New("onnxruntime: no library path given; set ONNXRUNTIME_LIB to the path of libonnxruntime.so (make ort fetches one)")
	}
	abs, err := filepath.Abs(libPath)
	if err != nil {
		return "", fmt.Errorf("onnxruntime: library path %q: %w", libPath, err)
	}
	if _, err := os.Stat(abs); err != nil {
		return "", fmt.Errorf("onnxruntime: library %s not found; set ONNXRUNTIME_LIB to the path of libonnxruntime.so (make ort fetches one): %w", abs, err)
	}
	return abs, nil
}
