package ort

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"h3infer/internal/onnxgen"
)

// loadEncoder writes an encoder with o into the test's directory and
// loads it.
func loadEncoder(t testing.TB, o onnxgen.EncoderOptions) *Encoder {
	t.Helper()
	needModel(t)
	dir := t.TempDir()
	if err := onnxgen.WriteEncoder(dir, o); err != nil {
		t.Fatal(err)
	}
	e, err := LoadEncoder(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

func norm(v []float32) float64 {
	var ss float64
	for _, x := range v {
		ss += float64(x) * float64(x)
	}
	return math.Sqrt(ss)
}

// TestEncoderBatchedEqualsAlone: rows of different lengths embedded in one
// padded batch get the vectors each gets alone, for every pooling, and
// normalized vectors have unit length.
func TestEncoderBatchedEqualsAlone(t *testing.T) {
	texts := []string{"hello", "a much longer input that pads the others", "x", "the same words, in another order: words the same"}
	for _, o := range []onnxgen.EncoderOptions{
		{Seed: 1},
		{Seed: 2, Pooling: "cls"},
		{Seed: 3, Raw: true, Layers: 1, Hidden: 48, Heads: 4},
	} {
		e := loadEncoder(t, o)
		if got, want := e.Info().EmbeddingSize, uint32(cmpOr(o.Hidden, onnxgen.DefaultEncoderHidden)); got != want || !e.Info().Encoder {
			t.Fatalf("%+v: info %+v, want an encoder of %d values", o, e.Info(), want)
		}
		rows := make([][]int, len(texts))
		for i, s := range texts {
			rows[i] = e.EncodeSpecial(s)
		}
		batched, err := e.Embed(rows, nil)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range rows {
			alone, err := e.Embed([][]int{r}, nil)
			if err != nil {
				t.Fatal(err)
			}
			if d := maxAbsDiff(alone[0], batched[i]); d > 1e-5 {
				t.Errorf("%+v: row %d differs by %g batched", o, i, d)
			}
			if n := norm(batched[i]); !o.Raw && math.Abs(n-1) > 1e-5 {
				t.Errorf("%+v: row %d has length %v, want 1", o, i, n)
			} else if o.Raw && math.Abs(n-1) < 1e-3 {
				t.Errorf("%+v: row %d has unit length without normalize", o, i)
			}
		}
		if maxAbsDiff(batched[0], batched[3]) == 0 {
			t.Errorf("%+v: different inputs gave the same vector", o)
		}
	}
}

func cmpOr(a, b int) int {
	if a != 0 {
		return a
	}
	return b
}

// TestEncoderRefusesGeneration: the loop's generation methods refuse on
// an encoder, and a decoder directory is not an encoder.
func TestEncoderRefusesGeneration(t *testing.T) {
	e := loadEncoder(t, onnxgen.EncoderOptions{})
	if _, _, err := e.Prefill([]int{1}); err == nil || !strings.Contains(err.Error(), "is an encoder") {
		t.Errorf("Prefill: got %v, want a refusal", err)
	}
	if _, err := e.Step([]int{1}); err == nil {
		t.Error("Step on an encoder succeeded")
	}
	if _, err := LoadEncoder(demo.ModelDir(), Options{}); err == nil || !strings.Contains(err.Error(), `not "embed"`) {
		t.Errorf("LoadEncoder of the demo decoder: got %v", err)
	}
}

// TestLoadEncoderChecksConfig: a hidden_size that disagrees with the
// graph, and pooling none on a graph with no pooled output, are refused
// at load.
func TestLoadEncoderChecksConfig(t *testing.T) {
	needModel(t)
	for name, tc := range map[string]struct{ from, to, want string }{
		"hidden size": {`"hidden_size": 64`, `"hidden_size": 65`, "hidden_size 65, but the graph's vectors have 64"},
		"no pooled":   {`"pooling": "mean"`, `"pooling": "none"`, `output: none of ["sentence_embedding" "pooler_output"]`},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if err := onnxgen.WriteEncoder(dir, onnxgen.EncoderOptions{}); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "model.json")
			raw, _ := os.ReadFile(path)
			edited := strings.Replace(string(raw), tc.from, tc.to, 1)
			if edited == string(raw) {
				t.Fatalf("model.json has no %s: %s", tc.from, raw)
			}
			os.WriteFile(path, []byte(edited), 0o644)
			if _, err := LoadEncoder(dir, Options{}); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
}

// TestEncoderDimensions: a shortened vector is the full one's leading
// values, made unit length again; rows beside it keep their length.
func TestEncoderDimensions(t *testing.T) {
	e := loadEncoder(t, onnxgen.EncoderOptions{Seed: 5})
	rows := [][]int{e.EncodeSpecial("shorten me"), e.EncodeSpecial("leave me")}
	full, err := e.Embed(rows, nil)
	if err != nil {
		t.Fatal(err)
	}
	cut, err := e.Embed(rows, []int{8, 0})
	if err != nil {
		t.Fatal(err)
	}
	if len(cut[0]) != 8 || len(cut[1]) != len(full[1]) {
		t.Fatalf("got lengths %d and %d, want 8 and %d", len(cut[0]), len(cut[1]), len(full[1]))
	}
	if n := norm(cut[0]); math.Abs(n-1) > 1e-5 {
		t.Errorf("shortened vector has length %v, want 1", n)
	}
	scale := norm(full[0][:8])
	for i, x := range cut[0] {
		if want := float64(full[0][i]) / scale; math.Abs(float64(x)-want) > 1e-5 {
			t.Errorf("value %d: %v, want %v", i, x, want)
		}
	}
}
