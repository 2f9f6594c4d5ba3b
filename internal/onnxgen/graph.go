package onnxgen

import (
	"fmt"
	"math"
)

// shape describes the transformer that buildGraph lays out. Every model this
// package writes, demo or random, has the same graph; only the weights differ.
type shape struct {
	vocab   int
	layers  int
	heads   int
	hidden  int
	headDim int
	mlp     int // hidden units of each layer's feed-forward block (a layer may shrink its own)
	context int // rows of the rotary tables: the largest position id + 1

	noPositions bool  // derive positions from attention_mask instead of a position_ids input
	kvType      int32 // element type of past and present; dtypeFloat when zero
	logitsType  int32 // element type of logits; dtypeFloat when zero
	// appendKV makes present hold only the new positions; the caller keeps
	// the cache and passes all of it as past (model.json kv_cache "append").
	appendKV bool
}

// layerWeights holds one pre-norm block: RMSNorm, attention with rotary
// positions, RMSNorm, ReLU MLP. Matrices are row-major [in, out] so that the
// graph multiplies activations on the left. The MLP width is len(b1).
type layerWeights struct {
	attnNorm []float32 // [hidden]
	wq       []float32 // [hidden, hidden]
	wk       []float32 // [hidden, hidden]
	wv       []float32 // [hidden, hidden]
	wo       []float32 // [hidden, hidden]
	mlpNorm  []float32 // [hidden]
	w1       []float32 // [hidden, mlp]
	b1       []float32 // [mlp]
	w2       []float32 // [mlp, hidden]
	b2       []float32 // [hidden]
}

type weights struct {
	embed     []float32 // [vocab, hidden]
	ropeCos   []float32 // [context, headDim], angle of pair i repeated at i and i+headDim/2
	ropeSin   []float32 // [context, headDim]
	layers    []layerWeights
	finalNorm []float32 // [hidden]
	lmHead    []float32 // [hidden, vocab]
}

// newWeights allocates zeroed weights with unit norm gains.
func newWeights(s shape) *weights {
	w := &weights{
		embed:     make([]float32, s.vocab*s.hidden),
		ropeCos:   make([]float32, s.context*s.headDim),
		ropeSin:   make([]float32, s.context*s.headDim),
		layers:    make([]layerWeights, s.layers),
		finalNorm: ones(s.hidden),
		lmHead:    make([]float32, s.hidden*s.vocab),
	}
	for i := range w.layers {
		w.layers[i] = layerWeights{
			attnNorm: ones(s.hidden),
			wq:       make([]float32, s.hidden*s.hidden),
			wk:       make([]float32, s.hidden*s.hidden),
			wv:       make([]float32, s.hidden*s.hidden),
			wo:       make([]float32, s.hidden*s.hidden),
			mlpNorm:  ones(s.hidden),
			w1:       make([]float32, s.hidden*s.mlp),
			b1:       make([]float32, s.mlp),
			w2:       make([]float32, s.mlp*s.hidden),
			b2:       make([]float32, s.hidden),
		}
	}
	return w
}

func ones(n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = 1
	}
	return v
}

// setRotary fills the rotary tables from one angular frequency per pair.
// Angles are computed in float64 and stored rounded, so precision does not
// decay with the position the way it would if the graph computed p*theta in
// float32.
func (w *weights) setRotary(s shape, freqs []float64) {
	half := s.headDim / 2
	for p := 0; p < s.context; p++ {
		for i := 0; i < half; i++ {
			a := float64(p) * freqs[i]
			c, sn := float32(math.Cos(a)), float32(math.Sin(a))
			row := p * s.headDim
			w.ropeCos[row+i], w.ropeCos[row+i+half] = c, c
			w.ropeSin[row+i], w.ropeSin[row+i+half] = sn, sn
		}
	}
}

// rmsEps is the RMSNorm epsilon baked into the graph.
const rmsEps = 1e-5

// maskedScore is added to the attention scores of keys a query may not see.
// It is finite so that a query with no visible key at all (a padding
// position) yields a uniform distribution instead of NaN.
const maskedScore = -1e9

// Names of the graph's inputs and outputs, the usual LLM export signature.
const (
	InputIDs      = "input_ids"
	AttentionMask = "attention_mask"
	PositionIDs   = "position_ids"
	Logits        = "logits"
)

// PastKey, PastValue, PresentKey and PresentValue name the per-layer cache
// tensors, laid out [batch, heads, positions, head_dim].
func PastKey(layer int) string      { return fmt.Sprintf("past_key_values.%d.key", layer) }
func PastValue(layer int) string    { return fmt.Sprintf("past_key_values.%d.value", layer) }
func PresentKey(layer int) string   { return fmt.Sprintf("present.%d.key", layer) }
func PresentValue(layer int) string { return fmt.Sprintf("present.%d.value", layer) }

// builder accumulates nodes and initializers with generated unique names.
type builder struct {
	g    graph
	next int
}

func (b *builder) op(opType string, inputs []string, attrs ...attribute) string {
	b.next++
	out := fmt.Sprintf("%s_%d", opType, b.next)
	b.g.nodes = append(b.g.nodes, node{
		name:    out,
		opType:  opType,
		inputs:  inputs,
		outputs: []string{out},
		attrs:   attrs,
	})
	return out
}

// opTo is op with a chosen output name, for graph outputs.
func (b *builder) opTo(out, opType string, inputs []string, attrs ...attribute) {
	b.next++
	b.g.nodes = append(b.g.nodes, node{
		name:    fmt.Sprintf("%s_%d", opType, b.next),
		opType:  opType,
		inputs:  inputs,
		outputs: []string{out},
		attrs:   attrs,
	})
}

func (b *builder) floats(name string, data []float32, dims ...int64) string {
	b.g.inits = append(b.g.inits, floatTensor(name, dims, data))
	return name
}

func (b *builder) ints(name string, data []int64, dims ...int64) string {
	b.g.inits = append(b.g.inits, int64Tensor(name, dims, data))
	return name
}

// rmsNorm computes x / sqrt(mean(x^2) + eps) * gain over the last axis.
func (b *builder) rmsNorm(x, gain, eps string) string {
	sq := b.op("Mul", []string{x, x})
	mean := b.op("ReduceMean", []string{sq}, intsAttr("axes", -1), intAttr("keepdims", 1))
	rms := b.op("Sqrt", []string{b.op("Add", []string{mean, eps})})
	return b.op("Mul", []string{b.op("Div", []string{x, rms}), gain})
}

// buildGraph lays out a decoder-only transformer:
//
//	x = embed[input_ids]
//	per layer: x += Wo·Attn(RoPE(Wq·n), RoPE(Wk·n), Wv·n), n = RMSNorm(x)
//	           x += W2·ReLU(W1·RMSNorm(x) + b1) + b2
//	logits = RMSNorm(x)·lm_head
//
// Rotary tables are gathered by position_ids, so positions come from the
// caller, as left padding needs (or, without position_ids, from the
// attention mask's running count). A cache narrower than float32 is stored
// cast and widened for the attention. Keys are cached after rotation, as exported
// LLMs do, and present = concat(past, new) along the position axis, or,
// with appendKV, present = new alone. A query sees key j when j <= past+i
// (causal within the new tokens) and attention_mask[j] is 1.
func buildGraph(s shape, w *weights) graph {
	b := &builder{}
	b.g.name = "h3infer_decoder"
	hd := int64(s.headDim)
	hid := int64(s.hidden)

	batch, seq, past, total := dim{param: "batch_size"}, dim{param: "sequence_length"},
		dim{param: "past_sequence_length"}, dim{param: "total_sequence_length"}
	kvType, logitsType := s.kvType, s.logitsType
	if kvType == 0 {
		kvType = dtypeFloat
	}
	if logitsType == 0 {
		logitsType = dtypeFloat
	}
	b.g.inputs = []valueInfo{
		{name: InputIDs, dtype: dtypeInt64, shape: []dim{batch, seq}},
		{name: AttentionMask, dtype: dtypeInt64, shape: []dim{batch, total}},
	}
	if !s.noPositions {
		b.g.inputs = append(b.g.inputs, valueInfo{name: PositionIDs, dtype: dtypeInt64, shape: []dim{batch, seq}})
	}
	b.g.outputs = []valueInfo{
		{name: Logits, dtype: logitsType, shape: []dim{batch, seq, {value: int64(s.vocab)}}},
	}
	for l := 0; l < s.layers; l++ {
		cache := []dim{batch, {value: int64(s.heads)}, past, {value: hd}}
		present := []dim{batch, {value: int64(s.heads)}, total, {value: hd}}
		if s.appendKV {
			present[2] = seq
		}
		b.g.inputs = append(b.g.inputs,
			valueInfo{name: PastKey(l), dtype: kvType, shape: cache},
			valueInfo{name: PastValue(l), dtype: kvType, shape: cache})
		b.g.outputs = append(b.g.outputs,
			valueInfo{name: PresentKey(l), dtype: kvType, shape: present},
			valueInfo{name: PresentValue(l), dtype: kvType, shape: present})
	}
	// cast converts x to type to, or returns it when no cast is needed.
	cast := func(x string, from, to int32) string {
		if from == to {
			return x
		}
		return b.op("Cast", []string{x}, intAttr("to", int64(to)))
	}

	// Shared constants.
	eps := b.floats("rms_eps", []float32{rmsEps})
	scale := b.floats("attn_scale", []float32{float32(1 / math.Sqrt(float64(s.headDim)))})
	masked := b.floats("masked_score", []float32{maskedScore})
	splitHeads := b.ints("split_heads_shape", []int64{0, 0, int64(s.heads), hd}, 4)
	mergeHeads := b.ints("merge_heads_shape", []int64{0, 0, hid}, 3)
	axis1 := b.ints("axis_1", []int64{1}, 1)
	axes12 := b.ints("axes_1_2", []int64{1, 2}, 2)
	zero := b.ints("zero", []int64{0})
	one := b.ints("one", []int64{1})
	rotHalf := b.floats("rotate_half", rotateHalfMatrix(s.headDim), hd, hd)

	// Attention mask [batch, 1, seq, total]: causal within the new tokens,
	// and only keys whose attention_mask entry is set.
	seqLen := b.op("Squeeze", []string{b.op("Shape", []string{InputIDs}, intAttr("start", 1), intAttr("end", 2))})
	totalLen := b.op("Squeeze", []string{b.op("Shape", []string{AttentionMask}, intAttr("start", 1), intAttr("end", 2))})
	pastLen := b.op("Sub", []string{totalLen, seqLen})
	keyIdx := b.op("Range", []string{zero, totalLen, one})
	queryIdx := b.op("Unsqueeze", []string{b.op("Range", []string{pastLen, totalLen, one}), axis1})
	causal := b.op("LessOrEqual", []string{keyIdx, queryIdx})
	padding := b.op("Unsqueeze", []string{b.op("Cast", []string{AttentionMask}, intAttr("to", int64(dtypeBool))), axes12})
	visible := b.op("And", []string{causal, padding})
	// One additive bias for all layers: an Add per layer is cheaper than a
	// Where per layer.
	maskBias := b.op("Where", []string{visible, b.floats("zero_score", []float32{0}), masked})

	// Rotary factors [batch, 1, seq, head_dim], shared by all layers.
	cosT := b.floats("rope_cos", w.ropeCos, int64(s.context), hd)
	sinT := b.floats("rope_sin", w.ropeSin, int64(s.context), hd)
	positions := PositionIDs
	if s.noPositions {
		// A token's position is the number of real tokens before it: the
		// cumulative sum of attention_mask minus one, over the new tokens'
		// columns. (Padding columns get -1 or repeat a position, but they
		// are never queries: new tokens are always real.)
		seq1 := b.op("Shape", []string{InputIDs}, intAttr("start", 1), intAttr("end", 2))
		total1 := b.op("Shape", []string{AttentionMask}, intAttr("start", 1), intAttr("end", 2))
		counted := b.op("Sub", []string{b.op("CumSum", []string{AttentionMask, b.ints("cumsum_axis", []int64{1})}), one})
		positions = b.op("Slice", []string{counted, b.op("Sub", []string{total1, seq1}), total1, axis1})
	}
	cos := b.op("Unsqueeze", []string{b.op("Gather", []string{cosT, positions}), axis1})
	sin := b.op("Unsqueeze", []string{b.op("Gather", []string{sinT, positions}), axis1})
	rope := func(x string) string {
		rotated := b.op("MatMul", []string{x, rotHalf})
		return b.op("Add", []string{b.op("Mul", []string{x, cos}), b.op("Mul", []string{rotated, sin})})
	}
	heads := func(x string) string { // [batch, seq, hidden] -> [batch, heads, seq, head_dim]
		return b.op("Transpose", []string{b.op("Reshape", []string{x, splitHeads})}, intsAttr("perm", 0, 2, 1, 3))
	}

	swapLast := func(x string) string { return b.op("Transpose", []string{x}, intsAttr("perm", 0, 1, 3, 2)) }
	// softmax turns raw scores [batch, heads, seq, total] into attention
	// weights: scaled, masked, normalised over the keys.
	softmax := func(scores string) string {
		scores = b.op("Add", []string{b.op("Mul", []string{scores, scale}), maskBias})
		return b.op("Softmax", []string{scores}, intAttr("axis", -1))
	}
	// appendAttention is a layer's attention when the cache is the
	// caller's (s.appendKV): present holds only the new positions, and the
	// past is read where it lies, never concatenated. Scores against the
	// past and against the new keys are computed apart and joined (they
	// are [seq, past] and [seq, seq], small beside the cache), and the
	// weights are split again to meet the past and new values.
	var pastCols, axis3, start, endOfAxis string
	if s.appendKV {
		pastCols = b.op("Shape", []string{PastKey(0)}, intAttr("start", 2), intAttr("end", 3))
		axis3 = b.ints("axis_3", []int64{3}, 1)
		start = b.ints("start_of_axis", []int64{0}, 1)
		endOfAxis = b.ints("end_of_axis", []int64{math.MaxInt64}, 1)
	}
	appendAttention := func(l int, q, k, v string) string {
		b.opTo(PresentKey(l), "Identity", []string{cast(k, dtypeFloat, kvType)})
		b.opTo(PresentValue(l), "Identity", []string{cast(v, dtypeFloat, kvType)})
		// The new positions are attended in the cache's element type, as
		// they will be when they are past.
		newK := cast(PresentKey(l), kvType, dtypeFloat)
		newV := cast(PresentValue(l), kvType, dtypeFloat)
		pastK := cast(PastKey(l), kvType, dtypeFloat)
		pastV := cast(PastValue(l), kvType, dtypeFloat)
		scores := b.op("Concat", []string{
			b.op("MatMul", []string{q, swapLast(pastK)}),
			b.op("MatMul", []string{q, swapLast(newK)}),
		}, intAttr("axis", 3))
		probs := softmax(scores)
		onPast := b.op("Slice", []string{probs, start, pastCols, axis3})
		onNew := b.op("Slice", []string{probs, pastCols, endOfAxis, axis3})
		return b.op("Add", []string{
			b.op("MatMul", []string{onPast, pastV}),
			b.op("MatMul", []string{onNew, newV}),
		})
	}

	embed := b.floats("embed_tokens", w.embed, int64(s.vocab), hid)
	x := b.op("Gather", []string{embed, InputIDs})
	for l, lw := range w.layers {
		p := fmt.Sprintf("layer%d.", l)
		n := b.rmsNorm(x, b.floats(p+"attn_norm", lw.attnNorm, hid), eps)
		q := rope(heads(b.op("MatMul", []string{n, b.floats(p+"wq", lw.wq, hid, hid)})))
		k := rope(heads(b.op("MatMul", []string{n, b.floats(p+"wk", lw.wk, hid, hid)})))
		v := heads(b.op("MatMul", []string{n, b.floats(p+"wv", lw.wv, hid, hid)}))
		var ctx string
		if s.appendKV {
			ctx = appendAttention(l, q, k, v)
		} else {
			b.opTo(PresentKey(l), "Concat", []string{PastKey(l), cast(k, dtypeFloat, kvType)}, intAttr("axis", 2))
			b.opTo(PresentValue(l), "Concat", []string{PastValue(l), cast(v, dtypeFloat, kvType)}, intAttr("axis", 2))
			keys := cast(PresentKey(l), kvType, dtypeFloat)
			vals := cast(PresentValue(l), kvType, dtypeFloat)
			probs := softmax(b.op("MatMul", []string{q, swapLast(keys)}))
			ctx = b.op("MatMul", []string{probs, vals})
		}
		ctx = b.op("Reshape", []string{b.op("Transpose", []string{ctx}, intsAttr("perm", 0, 2, 1, 3)), mergeHeads})
		x = b.op("Add", []string{x, b.op("MatMul", []string{ctx, b.floats(p+"wo", lw.wo, hid, hid)})})

		n = b.rmsNorm(x, b.floats(p+"mlp_norm", lw.mlpNorm, hid), eps)
		width := int64(len(lw.b1))
		h := b.op("Add", []string{b.op("MatMul", []string{n, b.floats(p+"w1", lw.w1, hid, width)}), b.floats(p+"b1", lw.b1, width)})
		h = b.op("Relu", []string{h})
		out := b.op("Add", []string{b.op("MatMul", []string{h, b.floats(p+"w2", lw.w2, width, hid)}), b.floats(p+"b2", lw.b2, hid)})
		x = b.op("Add", []string{x, out})
	}
	n := b.rmsNorm(x, b.floats("final_norm", w.finalNorm, hid), eps)
	lmHead := b.floats("lm_head", w.lmHead, hid, int64(s.vocab))
	if logitsType == dtypeFloat {
		b.opTo(Logits, "MatMul", []string{n, lmHead})
	} else {
		b.opTo(Logits, "Cast", []string{b.op("MatMul", []string{n, lmHead})}, intAttr("to", int64(logitsType)))
	}
	return b.g
}

// rotateHalfMatrix returns R with x·R = concat(-x[half:], x[:half]), the
// rotate-half step of rotary embeddings as one small matrix product.
func rotateHalfMatrix(headDim int) []float32 {
	half := headDim / 2
	r := make([]float32, headDim*headDim)
	for i := 0; i < half; i++ {
		r[(i+half)*headDim+i] = -1
		r[i*headDim+i+half] = 1
	}
	return r
}
