package ort

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"h3infer/engine"
	"h3infer/infer"
	"h3infer/workerconf"
)

// fakeProviderDir makes a folder laid out like a GPU provider set: the
// core library (a link to the real one) and provider libraries built here
// with gcc whose CUDA provider links against libcublasLt.so.13, which this
// machine does not have. The dynamic loader then fails exactly as it does
// on a host without CUDA.
func fakeProviderDir(t *testing.T) string {
	t.Helper()
	needModel(t)
	dir := t.TempDir()
	stubs := t.TempDir()
	src := filepath.Join(stubs, "p.c")
	if err := os.WriteFile(src, []byte("int h3infer_provider_probe;\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	gcc := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
			t.Fatalf("gcc %q: %v\n%s", args, err, out)
		}
	}
	// A library with the CUDA soname to link against, removed again so
	// that only the dependency on it remains.
	cublas := filepath.Join(stubs, "libcublasLt.so.13")
	gcc("-shared", "-fPIC", "-o", cublas, "-Wl,-soname,libcublasLt.so.13", src)
	gcc("-shared", "-fPIC", "-o", filepath.Join(dir, libProvidersShared), src)
	gcc("-shared", "-fPIC", "-o", filepath.Join(dir, libProvidersCUDA), src, "-Wl,--no-as-needed", cublas)
	if err := os.Remove(cublas); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(demo.Lib(), filepath.Join(dir, "libonnxruntime.so.1")); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "libonnxruntime.so.1")
}

// A GPU provider asked for outright fails to load with an error that
// names the library the host lacks.
func TestProviderMissingLibrary(t *testing.T) {
	needModel(t)
	cases := map[string]struct {
		lib, want string
	}{
		// A runtime with no provider libraries beside it.
		"no provider set": {coreAlone(t), libProvidersShared},
		// The provider set is there but CUDA is not.
		"no cuda": {fakeProviderDir(t), "libcublasLt.so.13"},
	}
	// The real provider set, when make ort-cuda has fetched it.
	if real, _ := filepath.Abs("../.cache/onnxruntime/" + ortCUDAVersion + "/libonnxruntime.so.1"); fileExists(real) {
		cases["fetched provider set"] = struct{ lib, want string }{real, "libcu"}
	}
	for name, tc := range cases {
		for _, p := range []workerconf.Provider{workerconf.ProviderCUDA, workerconf.ProviderTensorRT} {
			t.Run(name+"/"+string(p), func(t *testing.T) {
				m, err := LoadModel(demo.ModelDir(), Options{Provider: p, ORTLib: tc.lib})
				if err == nil {
					m.Close()
					t.Fatal("model loaded on a machine without a GPU")
				}
				var missing *MissingLibraryError
				if !errors.As(err, &missing) {
					t.Fatalf("got %v, want a MissingLibraryError", err)
				}
				if !strings.Contains(err.Error(), tc.want) || missing.Provider != p {
					t.Errorf("got %v, want it to name %s and provider %s", err, tc.want, p)
				}
				t.Log(err)
			})
		}
	}
}

// auto falls back to the CPU with a warning naming the missing library,
// and the model then serves exactly what a CPU model serves.
func TestProviderAutoFallsBack(t *testing.T) {
	lib := fakeProviderDir(t)
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	m, err := LoadModel(demo.ModelDir(), Options{Provider: workerconf.ProviderAuto, ORTLib: lib, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.Provider() != workerconf.ProviderCPU || m.DeviceKV() {
		t.Errorf("auto without CUDA: provider %s, device KV %v; want cpu without", m.Provider(), m.DeviceKV())
	}
	if !strings.Contains(logs.String(), "libcublasLt.so.13") || !strings.Contains(logs.String(), "level=WARN") {
		t.Errorf("fallback warning does not name the missing library:\n%s", logs.String())
	}
	cpu := loadTestModel(t)
	s := infer.Request{Model: "demo", Prompt: "The gateway ", MaxTokens: 40}
	got, _, err := engine.Generate(context.Background(), m, &s)
	if err != nil {
		t.Fatal(err)
	}
	want, _, err := engine.Generate(context.Background(), cpu, &s)
	if err != nil {
		t.Fatal(err)
	}
	if got != want || got == "" {
		t.Errorf("auto fell back and generated %q, cpu %q", got, want)
	}
}

// coreAlone links the runtime library into a folder of its own.
func coreAlone(t *testing.T) string {
	t.Helper()
	lib := filepath.Join(t.TempDir(), "libonnxruntime.so.1")
	if err := os.Symlink(demo.Lib(), lib); err != nil {
		t.Fatal(err)
	}
	return lib
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
