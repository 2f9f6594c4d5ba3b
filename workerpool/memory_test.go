package workerpool

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"h3infer/workerconf"
)

// writeSizedVersion writes a model version whose model.onnx and
// model.onnx.data have the given sizes (sparse files: the estimate reads
// sizes, not contents).
func writeSizedVersion(t *testing.T, root, ver string, onnx, data int64) {
	t.Helper()
	dir := filepath.Join(root, "m", ver)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, workerconf.ModelConfigFile), []byte(`{"name":"m","context_length":64,"eos_token":"<eos>"}`), 0o644)
	os.WriteFile(filepath.Join(dir, workerconf.TokenizerFile), []byte(`{}`), 0o644)
	for name, size := range map[string]int64{workerconf.ModelFile: onnx, "model.onnx.data": data} {
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
}

// A version whose load would take the workers' models past
// model_repository.memory_limit_bytes is refused before any worker is
// asked to load it, and recorded as failed; one that fits beside the
// loaded versions loads. The shared data file counts once, model.onnx once
// per worker, and so does each worker's KV-cache budget.
func TestMemoryLimitRefusesLoad(t *testing.T) {
	const mib = 1 << 20
	root := t.TempDir()
	// Each version: 1 MiB model.onnx (2 MiB in 2 workers) and 40 MiB of
	// shared data; 2 workers' KV budgets take 4 MiB. Two versions
	// together need about 88 MiB, three about 130 MiB.
	writeSizedVersion(t, root, "1", mib, 40*mib)
	fl := &fakeLoader{loaded: map[string]bool{}, broken: map[string]bool{}}
	r, err := NewRegistry(RegistryConfig{Root: root, MemoryLimit: 100 * mib, Workers: 2, KVCacheBytes: 2 * mib},
		fl, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	if _, err := r.Initial(); err != nil {
		t.Fatal(err)
	}
	writeSizedVersion(t, root, "2", mib, 40*mib)
	writeSizedVersion(t, root, "3", mib, 40*mib)
	writeSizedVersion(t, root, "4", 30*mib, mib) // 60 MiB in 2 workers: too much as well
	ctx := t.Context()
	if err := r.LoadVersion(ctx, "m", "2"); err != nil {
		t.Fatalf("version 2 fits beside 1 and was refused: %v", err)
	}
	for _, ver := range []string{"3", "4"} {
		err := r.LoadVersion(ctx, "m", ver)
		var ve *VersionError
		if err == nil || !errors.As(err, &ve) || ve.NotFound() || !strings.Contains(err.Error(), "model_repository.memory_limit_bytes 100 MiB") {
			t.Fatalf("version %s: got %v, want a conflict naming model_repository.memory_limit_bytes", ver, err)
		}
		if fl.loaded[Target("m", ver)] {
			t.Errorf("version %s: the workers were asked to load it", ver)
		}
		st := r.ModelStatus().([]ModelStatus)
		if len(st) != 1 || !strings.Contains(st[0].Failed[ver], "memory_limit_bytes") {
			t.Errorf("version %s: status %+v does not record the refusal", ver, st)
		}
	}
}

// Models that need more than the bound at start are an error before any
// worker starts.
func TestMemoryLimitAtStart(t *testing.T) {
	root := t.TempDir()
	writeSizedVersion(t, root, "1", 1<<20, 64<<20)
	fl := &fakeLoader{loaded: map[string]bool{}, broken: map[string]bool{}}
	r, err := NewRegistry(RegistryConfig{Root: root, MemoryLimit: 32 << 20, Workers: 1}, fl, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	if _, err := r.Initial(); err == nil || !strings.Contains(err.Error(), "memory_limit_bytes") {
		t.Errorf("got %v, want an error naming model_repository.memory_limit_bytes", err)
	}
}
