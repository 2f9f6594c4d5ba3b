package ort

import (
	"os"
	"testing"

	"h3infer/internal/demoenv"
	"h3infer/internal/onnxgen"
)

// demo is the runtime and the demo model, set up for the whole binary on
// first use (internal/demoenv).
var demo = demoenv.Env{Prefix: "h3infer-ort-test-", Init: InitRuntime}

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
func loadTestModel(t testing.TB) *Model {
	t.Helper()
	needModel(t)
	m, err := LoadModel(demo.ModelDir(), Options{})
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
