package onnxgen

import (
	"bytes"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	ort "github.com/yalue/onnxruntime_go"
)

// runEncoder runs the encoder in dir on rows of ids, right-padded with
// token 0 under a zero mask, and returns last_hidden_state.
func runEncoder(t *testing.T, dir string, rows [][]int64) ([]float32, int64) {
	t.Helper()
	requireORT(t)
	sess, err := ort.NewDynamicAdvancedSession(filepath.Join(dir, ModelFile), []string{InputIDs, AttentionMask}, []string{LastHiddenState}, nil)
	if err != nil {
		t.Fatalf("session: %v", err)
	}
	defer sess.Destroy()
	width := 0
	for _, r := range rows {
		width = max(width, len(r))
	}
	ids := make([]int64, len(rows)*width)
	mask := make([]int64, len(rows)*width)
	for i, r := range rows {
		for j, id := range r {
			ids[i*width+j], mask[i*width+j] = id, 1
		}
	}
	shape := ort.NewShape(int64(len(rows)), int64(width))
	idT, _ := ort.NewTensor(shape, ids)
	maskT, _ := ort.NewTensor(shape, mask)
	defer idT.Destroy()
	defer maskT.Destroy()
	out := []ort.Value{nil}
	if err := sess.Run([]ort.Value{idT, maskT}, out); err != nil {
		t.Fatalf("run: %v", err)
	}
	defer out[0].Destroy()
	got := out[0].(*ort.Tensor[float32])
	s := got.GetShape()
	if len(s) != 3 || s[0] != int64(len(rows)) || s[1] != int64(width) {
		t.Fatalf("last_hidden_state shape %v, want [%d, %d, hidden]", s, len(rows), width)
	}
	return append([]float32(nil), got.GetData()...), s[2]
}

// TestEncoderPaddingInvariant: a row's real positions come out the same
// whether it runs alone or padded beside a longer row, which is what lets
// the worker batch embedding inputs of different lengths.
func TestEncoderPaddingInvariant(t *testing.T) {
	dir := t.TempDir()
	if err := WriteEncoder(dir, EncoderOptions{Seed: 3}); err != nil {
		t.Fatal(err)
	}
	short := []int64{72, 101, 108}
	long := []int64{10, 20, 30, 40, 50, 60, 70}
	alone, hidden := runEncoder(t, dir, [][]int64{short})
	if hidden != DefaultEncoderHidden {
		t.Fatalf("hidden %d, want %d", hidden, DefaultEncoderHidden)
	}
	both, _ := runEncoder(t, dir, [][]int64{long, short})
	width := int64(len(long))
	for p := range int64(len(short)) {
		for h := range hidden {
			a, b := alone[p*hidden+h], both[(width+p)*hidden+h]
			if math.Abs(float64(a-b)) > 1e-5 {
				t.Fatalf("position %d value %d: %v alone, %v padded", p, h, a, b)
			}
		}
	}
	// Attention is bidirectional: a later token changes an earlier one.
	longer, _ := runEncoder(t, dir, [][]int64{append(short[:len(short):len(short)], 33)})
	if longer[0] == alone[0] {
		t.Error("the first position ignores the tokens after it")
	}
}

func TestWriteEncoder(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	opts := EncoderOptions{Seed: 9, Pooling: "cls", Raw: true, NoMatryoshka: true, Merges: 20}
	for _, d := range []string{a, b} {
		if err := WriteEncoder(d, opts); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{ModelFile, TokenizerFile, ConfigFile} {
		x, _ := os.ReadFile(filepath.Join(a, f))
		y, _ := os.ReadFile(filepath.Join(b, f))
		if len(x) == 0 || !bytes.Equal(x, y) {
			t.Errorf("%s: not identical for the same options", f)
		}
	}
	raw, _ := os.ReadFile(filepath.Join(a, ConfigFile))
	var cfg encoderConfig
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	want := encoderConfig{Name: "encoder", Task: "embed", ContextLength: DefaultEncoderContext, Pooling: "cls", HiddenSize: DefaultEncoderHidden, VocabSize: DefaultVocab + 20}
	if cfg != want {
		t.Errorf("model.json %+v, want %+v", cfg, want)
	}
	err := WriteEncoder(t.TempDir(), EncoderOptions{Hidden: 63, Heads: 2, Pooling: "max", Context: 8})
	for _, w := range []string{"hidden: must be a multiple of heads", "pooling:", "context:"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("got %v, want an error mentioning %q", err, w)
		}
	}
}
