package onnxgen

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"

	ort "github.com/yalue/onnxruntime_go"
)

// ORT helpers for this package's tests. They stay in a _test file so that
// the package itself never links ONNX Runtime.

// ortLibEnv names the ONNX Runtime shared library; tests that run models
// fail without it rather than skip, so a CI that forgets it notices.
const ortLibEnv = "ONNXRUNTIME_LIB"

func TestMain(m *testing.M) {
	lib := os.Getenv(ortLibEnv)
	if lib != "" {
		ort.SetSharedLibraryPath(lib)
		if err := ort.InitializeEnvironment(ort.WithLogLevelError()); err != nil {
			fmt.Fprintf(os.Stderr, "initialize ONNX Runtime from %s: %v\n", lib, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	if lib != "" {
		if err := ort.DestroyEnvironment(); err != nil {
			fmt.Fprintf(os.Stderr, "destroy ONNX Runtime environment: %v\n", err)
		}
	}
	os.Exit(code)
}

func requireORT(tb testing.TB) {
	tb.Helper()
	if !ort.IsInitialized() {
		tb.Fatalf("%s is not set: point it at libonnxruntime.so (1.24+), e.g. %s=/work/main/.cache/onnxruntime/1.24.1/libonnxruntime.so.1",
			ortLibEnv, ortLibEnv)
	}
}

// runner drives one model through ONNX Runtime with explicit cache tensors.
type runner struct {
	sess    *ort.DynamicAdvancedSession
	cfg     Config
	inputs  []string
	outputs []string
}

func newRunner(tb testing.TB, dir string) *runner {
	tb.Helper()
	requireORT(tb)
	raw, err := os.ReadFile(filepath.Join(dir, ConfigFile))
	if err != nil {
		tb.Fatalf("read config: %v", err)
	}
	var cfg Config
	if err := json.Unmarshal(raw, &cfg); err != nil {
		tb.Fatalf("decode config: %v", err)
	}
	r := &runner{cfg: cfg, inputs: []string{InputIDs, AttentionMask, PositionIDs}, outputs: []string{Logits}}
	for l := 0; l < cfg.NumLayers; l++ {
		r.inputs = append(r.inputs, PastKey(l), PastValue(l))
		r.outputs = append(r.outputs, PresentKey(l), PresentValue(l))
	}
	opts, err := ort.NewSessionOptions()
	if err != nil {
		tb.Fatalf("session options: %v", err)
	}
	defer opts.Destroy()
	// One thread: matches how a worker runs a session on this 2-core box and
	// keeps benchmark numbers comparable.
	if err := opts.SetIntraOpNumThreads(1); err != nil {
		tb.Fatalf("intra-op threads: %v", err)
	}
	if err := opts.SetInterOpNumThreads(1); err != nil {
		tb.Fatalf("inter-op threads: %v", err)
	}
	r.sess, err = ort.NewDynamicAdvancedSession(filepath.Join(dir, ModelFile), r.inputs, r.outputs, opts)
	if err != nil {
		tb.Fatalf("load %s with ONNX Runtime: %v", ModelFile, err)
	}
	tb.Cleanup(func() { r.sess.Destroy() })
	return r
}

// cache is the per-layer key/value state of a batch: 2*layers tensors laid
// out [batch, heads, positions, head_dim].
type cache []*ort.Tensor[float32]

func (c cache) destroy() {
	for _, t := range c {
		t.Destroy()
	}
}

func (c cache) positions() int64 {
	if len(c) == 0 {
		return 0
	}
	return c[0].GetShape()[2]
}

func (r *runner) emptyCache(tb testing.TB, batch int) cache {
	tb.Helper()
	c := make(cache, 2*r.cfg.NumLayers)
	for i := range c {
		t, err := ort.NewTensor(ort.NewShape(int64(batch), int64(r.cfg.NumHeads), 0, int64(r.cfg.HeadDim)), []float32{})
		if err != nil {
			tb.Fatalf("empty cache tensor: %v", err)
		}
		c[i] = t
	}
	return c
}

// step runs ids [batch][seq] with the given mask [batch][past+seq] and
// positions [batch][seq]. It returns logits [batch][seq][vocab] and the new
// cache; past is left for the caller to destroy.
func (r *runner) step(tb testing.TB, ids, mask, pos [][]int64, past cache) ([][][]float32, cache) {
	tb.Helper()
	b, s := len(ids), len(ids[0])
	in := []ort.Value{
		int64Input(tb, ids), int64Input(tb, mask), int64Input(tb, pos),
	}
	defer func() {
		for _, v := range in[:3] {
			v.Destroy()
		}
	}()
	for _, t := range past {
		in = append(in, t)
	}
	out := make([]ort.Value, len(r.outputs))
	if err := r.sess.Run(in, out); err != nil {
		tb.Fatalf("run: %v", err)
	}
	lt := out[0].(*ort.Tensor[float32])
	defer lt.Destroy()
	if got, want := lt.GetShape(), ort.NewShape(int64(b), int64(s), int64(r.cfg.VocabSize)); !got.Equals(want) {
		tb.Fatalf("logits shape %v, want %v", got, want)
	}
	flat := lt.GetData()
	logits := make([][][]float32, b)
	v := r.cfg.VocabSize
	for i := range logits {
		logits[i] = make([][]float32, s)
		for j := range logits[i] {
			logits[i][j] = append([]float32(nil), flat[(i*s+j)*v:(i*s+j+1)*v]...)
		}
	}
	next := make(cache, len(out)-1)
	for i, o := range out[1:] {
		next[i] = o.(*ort.Tensor[float32])
	}
	if got, want := next.positions(), past.positions()+int64(s); got != want {
		tb.Fatalf("present has %d positions, want %d", got, want)
	}
	return logits, next
}

func int64Input(tb testing.TB, rows [][]int64) *ort.Tensor[int64] {
	tb.Helper()
	var flat []int64
	for _, r := range rows {
		flat = append(flat, r...)
	}
	t, err := ort.NewTensor(ort.NewShape(int64(len(rows)), int64(len(rows[0]))), flat)
	if err != nil {
		tb.Fatalf("input tensor: %v", err)
	}
	return t
}

func bytesToIDs(s string) []int64 {
	ids := make([]int64, len(s))
	for i := 0; i < len(s); i++ {
		ids[i] = int64(s[i])
	}
	return ids
}

func idsToText(ids []int64) string {
	b := make([]byte, 0, len(ids))
	for _, id := range ids {
		if id < 256 {
			b = append(b, byte(id))
		} else {
			b = append(b, "<|"+fmt.Sprint(id)+"|>"...)
		}
	}
	return string(b)
}

func argmax32(v []float32) int64 {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return int64(best)
}

func maskOnes(n int) []int64 {
	v := make([]int64, n)
	for i := range v {
		v[i] = 1
	}
	return v
}

func iota64(from, n int) []int64 {
	v := make([]int64, n)
	for i := range v {
		v[i] = int64(from + i)
	}
	return v
}

// greedyCached decodes n tokens after prompt, feeding one token per step
// through the KV cache.
func (r *runner) greedyCached(tb testing.TB, prompt []int64, n int) []int64 {
	tb.Helper()
	c := r.emptyCache(tb, 1)
	logits, next := r.step(tb, [][]int64{prompt}, [][]int64{maskOnes(len(prompt))}, [][]int64{iota64(0, len(prompt))}, c)
	c.destroy()
	c = next
	defer func() { c.destroy() }()
	var out []int64
	tok := argmax32(logits[0][len(prompt)-1])
	for len(out) < n {
		out = append(out, tok)
		if len(out) == n {
			break
		}
		total := len(prompt) + len(out)
		logits, next = r.step(tb, [][]int64{{tok}}, [][]int64{maskOnes(total)}, [][]int64{{int64(total - 1)}}, c)
		c.destroy()
		c = next
		tok = argmax32(logits[0][0])
	}
	return out
}

// greedyFull decodes n tokens after prompt, recomputing the whole sequence
// with an empty cache at every step.
func (r *runner) greedyFull(tb testing.TB, prompt []int64, n int) []int64 {
	tb.Helper()
	seq := append([]int64(nil), prompt...)
	for range n {
		c := r.emptyCache(tb, 1)
		logits, next := r.step(tb, [][]int64{seq}, [][]int64{maskOnes(len(seq))}, [][]int64{iota64(0, len(seq))}, c)
		c.destroy()
		next.destroy()
		seq = append(seq, argmax32(logits[0][len(seq)-1]))
	}
	return seq[len(prompt):]
}

func maxAbsDiff(a, b []float32) float64 {
	d := 0.0
	for i := range a {
		d = math.Max(d, math.Abs(float64(a[i])-float64(b[i])))
	}
	return d
}
