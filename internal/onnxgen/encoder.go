package onnxgen

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
)

// The encoder: a small bidirectional transformer with random weights, the
// shape of the sentence-embedding exports h3infer serves on
// /v1/embeddings (input_ids and attention_mask in, last_hidden_state
// out). Its vectors mean nothing, but they are a deterministic function of
// the tokens that any serving bug (padding attended to, rows mixed up in a
// batch, pooling over the wrong positions) changes.

// LastHiddenState names the encoder's output, [batch, sequence, hidden].
const LastHiddenState = "last_hidden_state"

// EncoderOptions selects the encoder WriteEncoder produces. A zero field
// means its default.
type EncoderOptions struct {
	Layers  int   // transformer blocks (default 2)
	Heads   int   // attention heads (default 2)
	Hidden  int   // residual width and vector length (default 64)
	Context int   // learned positions, model.json context_length (default 512)
	Seed    int64 // weight seed; the same options give identical files
	// Merges is how many byte-level BPE merges tokenizer.json learns from
	// the demo corpus; 0 leaves one token per byte.
	Merges int
	// Pooling is model.json's pooling, "mean" (the default) or "cls".
	Pooling string
	// Raw leaves vectors unnormalized (model.json normalize false); by
	// default they are unit vectors, as most sentence encoders give.
	Raw bool
	// NoMatryoshka refuses OpenAI's dimensions parameter (model.json
	// matryoshka false).
	NoMatryoshka bool
}

// Encoder defaults.
const (
	DefaultEncoderLayers  = 2
	DefaultEncoderHeads   = 2
	DefaultEncoderHidden  = 64
	DefaultEncoderContext = 512
)

func (o EncoderOptions) withDefaults() EncoderOptions {
	if o.Layers == 0 {
		o.Layers = DefaultEncoderLayers
	}
	if o.Heads == 0 {
		o.Heads = DefaultEncoderHeads
	}
	if o.Hidden == 0 {
		o.Hidden = DefaultEncoderHidden
	}
	if o.Context == 0 {
		o.Context = DefaultEncoderContext
	}
	if o.Pooling == "" {
		o.Pooling = "mean"
	}
	return o
}

// validate reports every problem at once; vocab is the tokenizer's size.
func (o EncoderOptions) validate(vocab int) error {
	var errs []error
	check := func(ok bool, format string, args ...any) {
		if !ok {
			errs = append(errs, fmt.Errorf(format, args...))
		}
	}
	check(o.Layers >= 1 && o.Layers <= maxLayers, "layers: must be in [1, %d], got %d", maxLayers, o.Layers)
	check(o.Heads >= 1, "heads: must be >= 1, got %d", o.Heads)
	check(o.Hidden >= 2 && o.Hidden <= maxHidden, "hidden: must be in [2, %d], got %d", maxHidden, o.Hidden)
	check(o.Heads >= 1 && o.Hidden%o.Heads == 0, "hidden: must be a multiple of heads, got hidden %d, heads %d", o.Hidden, o.Heads)
	check(o.Context >= 16 && o.Context <= maxContext, "context: must be in [16, %d], got %d", maxContext, o.Context)
	check(o.Merges >= 0 && o.Merges <= maxVocab, "merges: must be in [0, %d], got %d", maxVocab, o.Merges)
	check(o.Pooling == "mean" || o.Pooling == "cls", "pooling: must be \"mean\" or \"cls\", got %q", o.Pooling)
	if len(errs) == 0 {
		h := int64(o.Hidden)
		n := 4 * (int64(o.Layers)*(12*h*h+7*h) + int64(vocab+o.Context)*h)
		check(n <= maxFileBytes, "model would take about %d MiB, more than the %d MiB limit", n>>20, maxFileBytes>>20)
	}
	return errors.Join(errs...)
}

// encoderConfig is the encoder's model.json.
type encoderConfig struct {
	Name          string `json:"name"`
	Task          string `json:"task"`
	ContextLength int    `json:"context_length"`
	Pooling       string `json:"pooling"`
	Normalize     bool   `json:"normalize"`
	Matryoshka    bool   `json:"matryoshka"`
	HiddenSize    int    `json:"hidden_size"`
	VocabSize     int    `json:"vocab_size"`
}

// WriteEncoder creates dir if needed and writes an encoder's model.onnx,
// tokenizer.json and model.json into it, each renamed into place whole.
func WriteEncoder(dir string, opts EncoderOptions) error {
	o := opts.withDefaults()
	var spec tokenizerSpec
	if o.Merges > 0 && o.Merges <= maxVocab {
		spec.merges, spec.symbols = learnMerges(corpus, o.Merges)
	}
	vocab := spec.size()
	if err := o.validate(vocab); err != nil {
		return fmt.Errorf("onnxgen: invalid encoder options: %w", err)
	}
	tok, err := tokenizerJSON(spec, vocab)
	if err != nil {
		return fmt.Errorf("onnxgen: %w", err)
	}
	cfg, err := marshalJSON(encoderConfig{
		Name: "encoder", Task: "embed", ContextLength: o.Context, Pooling: o.Pooling,
		Normalize: !o.Raw, Matryoshka: !o.NoMatryoshka, HiddenSize: o.Hidden, VocabSize: vocab,
	})
	if err != nil {
		return fmt.Errorf("onnxgen: encode %s: %w", ConfigFile, err)
	}
	m := model{
		producer: "h3infer-onnxgen",
		version:  "1",
		doc:      fmt.Sprintf("h3infer random encoder, seed %d", o.Seed),
		metadata: [][2]string{{"h3infer.model", "encoder"}},
		graph:    buildEncoder(o, vocab),
	}
	return writeFiles(dir, []namedFile{{TokenizerFile, tok}, {ConfigFile, cfg}, {ModelFile, m.marshal()}})
}

// buildEncoder lays out a pre-norm bidirectional transformer with learned
// absolute positions:
//
//	x = embed[input_ids] + positions[0..seq)
//	per layer: x += Wo·Attn(Wq·n, Wk·n, Wv·n), n = RMSNorm(x), every query
//	           seeing every key whose attention_mask is 1
//	           x += W2·ReLU(W1·RMSNorm(x) + b1) + b2
//	last_hidden_state = RMSNorm(x)
//
// A padded key gets a score of maskedScore, whose weight underflows to
// exactly 0, so a row's real positions come out as they would unpadded.
func buildEncoder(o EncoderOptions, vocab int) graph {
	rng := rand.New(rand.NewPCG(uint64(o.Seed), 0x656e63)) // stream id: "enc"
	normal := func(n int, std float64) []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = float32(rng.NormFloat64() * std)
		}
		return v
	}
	b := &builder{}
	b.g.name = "h3infer_encoder"
	hid, hd := int64(o.Hidden), int64(o.Hidden/o.Heads)
	mlp := 4 * hid
	batch, seq := dim{param: "batch_size"}, dim{param: "sequence_length"}
	b.g.inputs = []valueInfo{
		{name: InputIDs, dtype: dtypeInt64, shape: []dim{batch, seq}},
		{name: AttentionMask, dtype: dtypeInt64, shape: []dim{batch, seq}},
	}
	b.g.outputs = []valueInfo{{name: LastHiddenState, dtype: dtypeFloat, shape: []dim{batch, seq, {value: hid}}}}

	eps := b.floats("rms_eps", []float32{rmsEps})
	scale := b.floats("attn_scale", []float32{float32(1 / math.Sqrt(float64(hd)))})
	splitHeads := b.ints("split_heads_shape", []int64{0, 0, int64(o.Heads), hd}, 4)
	mergeHeads := b.ints("merge_heads_shape", []int64{0, 0, hid}, 3)
	axes12 := b.ints("axes_1_2", []int64{1, 2}, 2)
	zero := b.ints("zero", []int64{0})
	one := b.ints("one", []int64{1})

	// Additive key bias [batch, 1, 1, seq]: 0 for real tokens, maskedScore
	// for padding.
	keep := b.op("Unsqueeze", []string{b.op("Cast", []string{AttentionMask}, intAttr("to", int64(dtypeBool))), axes12})
	bias := b.op("Where", []string{keep, b.floats("zero_score", []float32{0}), b.floats("masked_score", []float32{maskedScore})})

	seqLen := b.op("Squeeze", []string{b.op("Shape", []string{InputIDs}, intAttr("start", 1), intAttr("end", 2))})
	posTable := b.floats("position_embeddings", normal(o.Context*o.Hidden, 0.5), int64(o.Context), hid)
	pos := b.op("Gather", []string{posTable, b.op("Range", []string{zero, seqLen, one})})
	embed := b.floats("embed_tokens", normal(vocab*o.Hidden, 1), int64(vocab), hid)
	x := b.op("Add", []string{b.op("Gather", []string{embed, InputIDs}), pos})

	heads := func(x string) string {
		return b.op("Transpose", []string{b.op("Reshape", []string{x, splitHeads})}, intsAttr("perm", 0, 2, 1, 3))
	}
	in := 1 / math.Sqrt(float64(o.Hidden))
	for l := range o.Layers {
		p := fmt.Sprintf("layer%d.", l)
		n := b.rmsNorm(x, b.floats(p+"attn_norm", ones(o.Hidden), hid), eps)
		proj := func(name string) string {
			return heads(b.op("MatMul", []string{n, b.floats(p+name, normal(o.Hidden*o.Hidden, in), hid, hid)}))
		}
		q, k, v := proj("wq"), proj("wk"), proj("wv")
		scores := b.op("MatMul", []string{q, b.op("Transpose", []string{k}, intsAttr("perm", 0, 1, 3, 2))})
		scores = b.op("Add", []string{b.op("Mul", []string{scores, scale}), bias})
		ctx := b.op("MatMul", []string{b.op("Softmax", []string{scores}, intAttr("axis", -1)), v})
		ctx = b.op("Reshape", []string{b.op("Transpose", []string{ctx}, intsAttr("perm", 0, 2, 1, 3)), mergeHeads})
		x = b.op("Add", []string{x, b.op("MatMul", []string{ctx, b.floats(p+"wo", normal(o.Hidden*o.Hidden, in), hid, hid)})})

		n = b.rmsNorm(x, b.floats(p+"mlp_norm", ones(o.Hidden), hid), eps)
		h := b.op("Add", []string{b.op("MatMul", []string{n, b.floats(p+"w1", normal(o.Hidden*int(mlp), in), hid, mlp)}), b.floats(p+"b1", normal(int(mlp), 0.02), mlp)})
		h = b.op("Relu", []string{h})
		out := b.op("Add", []string{b.op("MatMul", []string{h, b.floats(p+"w2", normal(int(mlp)*o.Hidden, 1/math.Sqrt(float64(mlp))), mlp, hid)}), b.floats(p+"b2", normal(o.Hidden, 0.02), hid)})
		x = b.op("Add", []string{x, out})
	}
	b.opTo(LastHiddenState, "Identity", []string{b.rmsNorm(x, b.floats("final_norm", ones(o.Hidden), hid), eps)})
	return b.g
}
