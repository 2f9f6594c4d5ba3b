package engine

import (
	"log/slog"
	"os"
	"strings"
	"testing"

	"h3infer/internal/demoenv"
	"h3infer/ort"
	"h3infer/workerconf"
)

// The loop's tests drive it with the models production serves: the demo
// model through ONNX Runtime (package ort, which imports nothing of this
// package) and the synthetic model.
var _ Model = (*ort.Model)(nil)

// demo is the runtime and the demo model, set up for the whole binary on
// first use (internal/demoenv).
var demo = demoenv.Env{Prefix: "h3infer-engine-test-", Init: ort.InitRuntime}

func TestMain(m *testing.M) {
	code := m.Run()
	demo.Remove()
	os.Exit(code)
}

// needModel fails the test when the runtime or the demo model is missing.
func needModel(t testing.TB) {
	t.Helper()
	demo.Need(t)
}

// loadTestModel loads the demo model and closes it at the end of the test.
func loadTestModel(t testing.TB) *ort.Model {
	t.Helper()
	needModel(t)
	return loadModelDir(t, "demo", demo.ModelDir(), ort.Options{})
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
		if cfg, err := workerconf.ReadModelConfig(spec.Dir); err == nil && cfg.IsEncoder() {
			e, err := ort.OpenEncoder(s, spec, log)
			if err != nil {
				return nil, err
			}
			return e, nil
		}
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
