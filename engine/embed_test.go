package engine

import (
	"math"
	"strings"
	"sync"
	"testing"

	"h3infer/infer"
	"h3infer/internal/onnxgen"
	"h3infer/ort"
	"h3infer/transport"
)

// An encoder of ONNX Runtime is what the loop serves embeddings with.
var _ Embedder = (*ort.Encoder)(nil)

// embedRecorder is a recorder that also keeps the vectors the loop sends.
type embedRecorder struct {
	*recorder
	emu     sync.Mutex
	vectors map[uint64][][]float32
	frames  map[uint64]int
}

func (r *embedRecorder) SendEmbeddings(outs []transport.EmbeddingOut) error {
	for _, o := range outs {
		r.emu.Lock()
		if int(o.Embedding.Index) != len(r.vectors[o.ID]) {
			panic("vectors out of order")
		}
		r.vectors[o.ID] = append(r.vectors[o.ID], o.Embedding.Vectors...)
		r.frames[o.ID]++
		r.emu.Unlock()
		if o.Done != nil {
			r.SendDone(o.ID, *o.Done)
		}
	}
	return nil
}

// runsOf wraps an Embedder and keeps the number of rows of every run.
type runsOf struct {
	Embedder
	runs []int
}

func (r *runsOf) Embed(rows [][]int, dims []int) ([][]float32, error) {
	r.runs = append(r.runs, len(rows))
	return r.Embedder.Embed(rows, dims)
}

// encoderLoop is a workerLoop serving a real encoder as "enc" (runs
// counted) and the demo model as "demo".
func encoderLoop(t *testing.T, slots int, o onnxgen.EncoderOptions) (*workerLoop, *embedRecorder, *runsOf, chan inbound) {
	t.Helper()
	needModel(t)
	dir := t.TempDir()
	if err := onnxgen.WriteEncoder(dir, o); err != nil {
		t.Fatal(err)
	}
	e, err := ort.LoadEncoder(dir, ort.Options{Name: "enc"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	runs := &runsOf{Embedder: e}
	rec := &embedRecorder{recorder: newRecorder(), vectors: map[uint64][][]float32{}, frames: map[uint64]int{}}
	w := newWorkerLoop(rec, slots, 1<<30, map[string]Model{"enc": runs, "demo": loadTestModel(t)}, testLogger(t))
	t.Cleanup(w.closeAll)
	return w, rec, runs, make(chan inbound, 64)
}

func embedIn(id uint64, e infer.EmbedRequest) inbound {
	return inbound{typ: transport.FrameEmbed, id: id, submit: infer.Request{Model: "enc", Embed: &e}}
}

func runEmbeds(t *testing.T, w *workerLoop, inbox chan inbound) {
	t.Helper()
	for range 1000 {
		if !w.embedding() && len(inbox) == 0 {
			return
		}
		if err := w.round(inbox); err != nil {
			t.Fatal(err)
		}
	}
	t.Fatal("embedding requests still waiting after 1000 rounds")
}

func maxDiff(a, b []float32) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	d := 0.0
	for i := range a {
		d = max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

// TestEmbedBatchesAcrossRequests: requests that arrive together share one
// run of the encoder, and each input's vector is the one it gets alone;
// usage counts every input's tokens.
func TestEmbedBatchesAcrossRequests(t *testing.T) {
	w, rec, runs, inbox := encoderLoop(t, 8, onnxgen.EncoderOptions{Seed: 4})
	reqs := map[uint64]infer.EmbedRequest{
		1: {Texts: []string{"short", "a considerably longer input than the first"}},
		2: {Tokens: [][]uint32{{72, 105}, {1, 2, 3, 4, 5, 6, 7, 8, 9}}},
		3: {Texts: []string{"cut to sixteen values"}, Dimensions: 16},
	}
	for id := uint64(1); id <= 3; id++ {
		inbox <- embedIn(id, reqs[id])
	}
	runEmbeds(t, w, inbox)
	if len(runs.runs) != 1 || runs.runs[0] != 5 {
		t.Errorf("runs of %v rows, want one run of all 5 inputs", runs.runs)
	}
	enc := runs.Embedder
	for id, req := range reqs {
		if e, ok := rec.errs[id]; ok {
			t.Fatalf("request %d: %+v", id, e)
		}
		var rows [][]int
		for _, s := range req.Texts {
			rows = append(rows, enc.EncodeSpecial(s))
		}
		for _, ids := range req.Tokens {
			row := make([]int, len(ids))
			for i, x := range ids {
				row[i] = int(x)
			}
			rows = append(rows, row)
		}
		tokens := 0
		for i, r := range rows {
			tokens += len(r)
			alone, err := enc.Embed([][]int{r}, []int{int(req.Dimensions)})
			if err != nil {
				t.Fatal(err)
			}
			if d := maxDiff(rec.vectors[id][i], alone[0]); d > 1e-5 {
				t.Errorf("request %d input %d: differs by %g from its vector alone", id, i, d)
			}
		}
		if got := rec.done[id].PromptTokens; int(got) != tokens {
			t.Errorf("request %d: prompt_tokens %d, want %d", id, got, tokens)
		}
	}
	if n := len(rec.vectors[3][0]); n != 16 {
		t.Errorf("dimensions 16 gave %d values", n)
	}
}

// TestEmbedManyInputs: a request of more inputs than a run holds takes
// several runs, and its vectors arrive complete and in order.
func TestEmbedManyInputs(t *testing.T) {
	w, rec, runs, inbox := encoderLoop(t, 4, onnxgen.EncoderOptions{Seed: 6})
	texts := make([]string, 3*maxEmbedRows+5)
	for i := range texts {
		texts[i] = strings.Repeat("ab", i%7+1)
	}
	inbox <- embedIn(1, infer.EmbedRequest{Texts: texts})
	runEmbeds(t, w, inbox)
	if len(runs.runs) != 4 || runs.runs[0] != maxEmbedRows {
		t.Errorf("runs of %v rows, want 4 runs of at most %d", runs.runs, maxEmbedRows)
	}
	if got := len(rec.vectors[1]); got != len(texts) {
		t.Fatalf("%d vectors for %d inputs", got, len(texts))
	}
	alone, err := runs.Embedder.Embed([][]int{runs.Embedder.EncodeSpecial(texts[70])}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := maxDiff(rec.vectors[1][70], alone[0]); d > 1e-5 {
		t.Errorf("input 70 differs by %g from its vector alone", d)
	}
}

// TestEmbedRefusals: what the worker refuses, each with its code and a
// message naming the input or parameter.
func TestEmbedRefusals(t *testing.T) {
	w, rec, _, inbox := encoderLoop(t, 8, onnxgen.EncoderOptions{Context: 16, NoMatryoshka: true})
	tests := []struct {
		in         inbound
		code, want string
	}{
		{embedIn(1, infer.EmbedRequest{Texts: []string{"fits", strings.Repeat("x", 17)}}), infer.CodeContextLength, "input[1] is 17 tokens, more than the model's context length of 16"},
		{embedIn(2, infer.EmbedRequest{Tokens: [][]uint32{{1, 99999}}}), infer.CodeInvalidRequest, "input[0][1]: token id 99999 is not below the vocabulary size"},
		{embedIn(3, infer.EmbedRequest{Texts: []string{"a"}, Dimensions: 8}), infer.CodeInvalidRequest, "dimensions: the model does not support"},
		{embedIn(4, infer.EmbedRequest{Texts: []string{""}}), infer.CodeInvalidRequest, "input[0]: no tokens"},
		{inbound{typ: transport.FrameEmbed, id: 5, submit: infer.Request{Model: "demo", Embed: &infer.EmbedRequest{Texts: []string{"a"}}}}, infer.CodeInvalidRequest, "generates text and serves no embeddings"},
		{submit(6, infer.Request{Model: "enc", Prompt: "hello", MaxTokens: 3}), infer.CodeInvalidRequest, "is an embedding model and generates no text"},
	}
	for _, tc := range tests {
		inbox <- tc.in
	}
	runEmbeds(t, w, inbox)
	for _, tc := range tests {
		e, ok := rec.errs[tc.in.id]
		if !ok || e.Code != tc.code || !strings.Contains(e.Message, tc.want) {
			t.Errorf("request %d: got %+v (%v), want %s mentioning %q", tc.in.id, e, ok, tc.code, tc.want)
		}
		if _, sent := rec.vectors[tc.in.id]; sent {
			t.Errorf("request %d: vectors sent for a refused request", tc.in.id)
		}
	}
}

// TestEmbedCancel: a cancelled request's remaining inputs are not run and
// nothing more is sent for it.
func TestEmbedCancel(t *testing.T) {
	w, rec, runs, inbox := encoderLoop(t, 4, onnxgen.EncoderOptions{})
	texts := make([]string, 4*maxEmbedRows)
	for i := range texts {
		texts[i] = "same"
	}
	inbox <- embedIn(1, infer.EmbedRequest{Texts: texts})
	if err := w.round(inbox); err != nil {
		t.Fatal(err)
	}
	inbox <- inbound{typ: transport.FrameCancel, id: 1}
	runEmbeds(t, w, inbox)
	if len(runs.runs) != 1 || len(rec.vectors[1]) != maxEmbedRows {
		t.Errorf("runs %v and %d vectors, want one run's %d", runs.runs, len(rec.vectors[1]), maxEmbedRows)
	}
	if _, done := rec.done[1]; done {
		t.Error("a cancelled request got Done")
	}
}

// TestEmbedLargeInputsTokenizedAside: a request with more than
// prepareInline bytes of text is tokenized beside the loop and comes back
// through its inbox; its vectors are those of the inputs tokenized
// inline.
func TestEmbedLargeInputsTokenizedAside(t *testing.T) {
	w, rec, runs, inbox := encoderLoop(t, 4, onnxgen.EncoderOptions{})
	stop := make(chan struct{})
	w.inbox, w.stop = inbox, stop
	t.Cleanup(func() { close(stop); w.preparers.Wait() })
	big := make([]string, 40)
	for i := range big {
		big[i] = strings.Repeat(string(rune('a'+i%26)), prepareInline/32)
	}
	if err := w.handle(embedIn(1, infer.EmbedRequest{Texts: big})); err != nil {
		t.Fatal(err)
	}
	if !w.embedPreparing(1) || w.embedding() {
		t.Fatal("a large request was not handed to a goroutine")
	}
	for w.embedPreparing(1) {
		if err := w.handle(<-inbox); err != nil {
			t.Fatal(err)
		}
	}
	runEmbeds(t, w, inbox)
	if len(rec.vectors[1]) != len(big) {
		t.Fatalf("%d vectors for %d inputs (errors %+v)", len(rec.vectors[1]), len(big), rec.errs)
	}
	alone, err := runs.Embedder.Embed([][]int{runs.Embedder.EncodeSpecial(big[3])}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := maxDiff(rec.vectors[1][3], alone[0]); d > 1e-5 {
		t.Errorf("input 3 differs by %g", d)
	}
}
