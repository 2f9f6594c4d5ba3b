package ort

import (
	"strings"
	"testing"
)

func TestRuntimeLibraryMissing(t *testing.T) {
	for name, path := range map[string]string{"empty": "", "absent": t.TempDir() + "/libonnxruntime.so"} {
		t.Run(name, func(t *testing.T) {
			_, err := runtimeLibrary(path)
			if err == nil || !strings.Contains(err.Error(), "ONNXRUNTIME_LIB") {
				t.Errorf("got %v, want an error that points at ONNXRUNTIME_LIB", err)
			}
		})
	}
}
