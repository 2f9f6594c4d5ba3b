package ort

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"path/filepath"

	onnxrt "github.com/yalue/onnxruntime_go"

	"h3infer/infer"
	"h3infer/tokenize"
	"h3infer/workerconf"
)

// Encoder is a loaded encoder model (model.json task "embed"): its ONNX
// Runtime session and tokenizer, and how its output becomes one vector
// per input. It serves embedding requests and generates nothing; the
// generation methods the loop's Model interface asks for refuse.
//
// Embed is safe for concurrent use: ONNX Runtime allows concurrent runs
// of one session.
type Encoder struct {
	name    string
	cfg     workerconf.ModelConfig
	tok     *tokenize.Tokenizer
	chat    *tokenize.ChatTemplate
	session *onnxrt.DynamicAdvancedSession
	place   placement
	weights weightMode

	typeIDs bool   // the graph takes token_type_ids (BERT exports), fed zeros
	output  string // last_hidden_state, or a pooled output
	pooled  bool   // output is [batch, hidden], pooled by the graph
	hidden  int64  // the vectors' length
}

// Encoder outputs LoadEncoder takes, by model.json pooling: a graph's own
// pooling (pooling "none") under the names sentence-transformers and
// Hugging Face exports give it, else the last hidden state.
var pooledOutputs = []string{"sentence_embedding", "pooler_output"}

const lastHiddenState = "last_hidden_state"

// LoadEncoder loads the encoder in dir: model.json (task "embed"),
// tokenizer.json and model.onnx, whose inputs are input_ids and
// attention_mask (int64, [batch, sequence]) and optionally
// token_type_ids, and whose output is last_hidden_state (float32,
// [batch, sequence, hidden]), or with pooling "none" a pooled
// sentence_embedding or pooler_output ([batch, hidden]). InitRuntime must
// have succeeded first. It runs the graph once on one token, which learns
// the vectors' length where the graph leaves it symbolic and catches a
// graph that does not run.
func LoadEncoder(dir string, opts Options) (*Encoder, error) {
	cfg, err := workerconf.ReadModelConfig(dir)
	if err != nil {
		return nil, fmt.Errorf("load encoder %s: %w", dir, err)
	}
	if !cfg.IsEncoder() {
		return nil, fmt.Errorf("load encoder %s: %s: task is %q, not %q", dir, modelConfigFile, cfg.Task, workerconf.TaskEmbed)
	}
	tok, err := tokenize.Load(filepath.Join(dir, tokenizerFile))
	if err != nil {
		return nil, fmt.Errorf("load encoder %s: %w", dir, err)
	}
	e := &Encoder{name: cfg.Name, cfg: cfg, tok: tok}
	if opts.Name != "" {
		e.name = opts.Name
	}
	if e.chat, err = cfg.LoadChatTemplate(dir); err != nil {
		return nil, fmt.Errorf("load encoder %s: %w", dir, err)
	}
	if cfg.VocabSize != 0 && cfg.VocabSize < tok.VocabSize() {
		return nil, fmt.Errorf("load encoder %s: %s: vocab_size %d is less than the %d tokens of %s", dir, modelConfigFile, cfg.VocabSize, tok.VocabSize(), tokenizerFile)
	}
	path := filepath.Join(dir, modelFile)
	ins, outs, err := inspect(path)
	if err != nil {
		return nil, fmt.Errorf("load encoder %s: inspect %s: %w", dir, modelFile, err)
	}
	inNames, err := e.bindSignature(ins, outs)
	if err != nil {
		return nil, fmt.Errorf("load encoder %s: %s: %w", dir, modelFile, err)
	}
	if opts.Provider != "" && opts.Provider != workerconf.ProviderCPU && opts.ORTLib == "" {
		return nil, fmt.Errorf("load encoder %s: provider %s: %w", dir, opts.Provider, errNoLibrary)
	}
	if e.place, err = choosePlacement(opts, opts.Log); err != nil {
		return nil, fmt.Errorf("load encoder %s: %w", dir, err)
	}
	if e.session, e.weights, err = newSession(dir, opts, e.place, inNames, []string{e.output}); err != nil {
		return nil, fmt.Errorf("load encoder %s: %w", dir, err)
	}
	v, err := e.Embed([][]int{{0}}, nil)
	if err != nil {
		e.session.Destroy()
		return nil, fmt.Errorf("load encoder %s: warm-up: %w", dir, err)
	}
	if e.hidden = int64(len(v[0])); cfg.HiddenSize != 0 && int64(cfg.HiddenSize) != e.hidden {
		e.session.Destroy()
		return nil, fmt.Errorf("load encoder %s: %s: hidden_size %d, but the graph's vectors have %d values", dir, modelConfigFile, cfg.HiddenSize, e.hidden)
	}
	return e, nil
}

// bindSignature checks the graph's inputs and picks its output, and
// returns the inputs in the order Embed passes them.
func (e *Encoder) bindSignature(ins, outs []onnxrt.InputOutputInfo) ([]string, error) {
	var errs []error
	byName := map[string]onnxrt.InputOutputInfo{}
	for _, in := range ins {
		byName[in.Name] = in
		switch in.Name {
		case "input_ids", "attention_mask", "token_type_ids":
			if in.DataType != onnxrt.TensorElementDataTypeInt64 {
				errs = append(errs, fmt.Errorf("input %q: must be int64, got %s", in.Name, in.DataType))
			}
		default:
			errs = append(errs, fmt.Errorf("input %q: an encoder takes only input_ids, attention_mask and token_type_ids", in.Name))
		}
	}
	names := []string{"input_ids", "attention_mask"}
	for _, n := range names {
		if _, ok := byName[n]; !ok {
			errs = append(errs, fmt.Errorf("input %q: missing", n))
		}
	}
	if _, ok := byName["token_type_ids"]; ok {
		e.typeIDs = true
		names = append(names, "token_type_ids")
	}
	want, rank := []string{lastHiddenState}, 3
	if e.cfg.Pooling == workerconf.PoolNone {
		want, rank = pooledOutputs, 2
	}
	for _, out := range outs {
		for _, w := range want {
			if out.Name != w || e.output != "" {
				continue
			}
			e.output = w
			switch {
			case out.DataType != onnxrt.TensorElementDataTypeFloat:
				errs = append(errs, fmt.Errorf("output %q: must be float32, got %s", w, out.DataType))
			case len(out.Dimensions) != rank:
				errs = append(errs, fmt.Errorf("output %q: must have %d dimensions, got %v", w, rank, out.Dimensions))
			}
		}
	}
	if e.output == "" {
		errs = append(errs, fmt.Errorf("output: none of %q (%s pooling %q)", want, modelConfigFile, e.cfg.Pooling))
	}
	e.pooled = rank == 2
	return names, errors.Join(errs...)
}

// Embed runs rows of token ids through the encoder as one batch, each row
// right-padded to the longest under a zero attention mask, and returns
// each row's vector: pooled as model.json's pooling says (the mean of the
// row's real positions, or its first position's) and, with normalize,
// scaled to unit length. dims, when not nil, shortens row i's vector to
// its first dims[i] values where dims[i] is above 0 and below its length,
// before the normalization (OpenAI's dimensions: a Matryoshka model's
// leading values, made unit length again). A row's vector does not depend
// on the rows beside it beyond float rounding: padding is masked out of
// attention and out of the pooling.
func (e *Encoder) Embed(rows [][]int, dims []int) ([][]float32, error) {
	if len(rows) == 0 {
		return nil, nil
	}
	width := 0
	for i, r := range rows {
		if len(r) == 0 {
			return nil, fmt.Errorf("model %s: embed: row %d has no tokens", e.name, i)
		}
		width = max(width, len(r))
	}
	n := len(rows)
	ids := make([]int64, n*width)
	mask := make([]int64, n*width)
	for i, r := range rows {
		for j, id := range r {
			ids[i*width+j], mask[i*width+j] = int64(id), 1
		}
	}
	var vs values
	defer vs.destroy()
	shape := onnxrt.NewShape(int64(n), int64(width))
	inputs := make([]onnxrt.Value, 0, 3)
	if err := vs.add(&inputs, shape, ids); err != nil {
		return nil, fmt.Errorf("model %s: embed: input_ids: %w", e.name, err)
	}
	if err := vs.add(&inputs, shape, mask); err != nil {
		return nil, fmt.Errorf("model %s: embed: attention_mask: %w", e.name, err)
	}
	if e.typeIDs {
		if err := vs.add(&inputs, shape, make([]int64, n*width)); err != nil {
			return nil, fmt.Errorf("model %s: embed: token_type_ids: %w", e.name, err)
		}
	}
	outputs := []onnxrt.Value{nil}
	var out []float32
	if e.hidden > 0 {
		// Into Go memory: a runtime-allocated output would be copied once
		// more.
		outShape := onnxrt.NewShape(int64(n), int64(width), e.hidden)
		if e.pooled {
			outShape = onnxrt.NewShape(int64(n), e.hidden)
		}
		out = make([]float32, outShape.FlattenedSize())
		outputs = outputs[:0]
		if err := vs.add(&outputs, outShape, out); err != nil {
			return nil, fmt.Errorf("model %s: embed: output: %w", e.name, err)
		}
	}
	if err := e.session.Run(inputs, outputs); err != nil {
		if e.hidden == 0 && outputs[0] != nil {
			outputs[0].Destroy()
		}
		return nil, fmt.Errorf("model %s: embed %d rows of %d tokens: %w", e.name, n, width, err)
	}
	hidden := e.hidden
	if hidden == 0 {
		vs.owned = append(vs.owned, outputs[0])
		t, ok := outputs[0].(*onnxrt.Tensor[float32])
		s := outputs[0].GetShape()
		want := 3
		if e.pooled {
			want = 2
		}
		if !ok || len(s) != want || s[0] != int64(n) || s[len(s)-1] <= 0 || (!e.pooled && s[1] != int64(width)) {
			return nil, fmt.Errorf("model %s: %s: got %T %v for %d rows of %d tokens", e.name, e.output, outputs[0], s, n, width)
		}
		out, hidden = t.GetData(), s[len(s)-1]
	}
	h := int(hidden)
	vecs := make([][]float32, n)
	flat := make([]float32, n*h)
	for i, r := range rows {
		v := flat[i*h : (i+1)*h : (i+1)*h]
		switch {
		case e.pooled:
			copy(v, out[i*h:])
		case e.cfg.Pooling == workerconf.PoolCLS:
			copy(v, out[i*width*h:])
		default:
			meanPool(v, out[i*width*h:], len(r))
		}
		if dims != nil && dims[i] > 0 && dims[i] < h {
			v = v[:dims[i]:dims[i]]
		}
		if e.cfg.Normalize {
			normalize(v)
		}
		vecs[i] = v
	}
	return vecs, nil
}

// meanPool sets v to the mean of the first n positions of states, laid
// out position by position, len(v) values each; the sum runs in float64.
func meanPool(v, states []float32, n int) {
	h := len(v)
	for k := range v {
		var sum float64
		for p := range n {
			sum += float64(states[p*h+k])
		}
		v[k] = float32(sum / float64(n))
	}
}

// normalize scales v to unit length (L2); a zero vector stays zero.
func normalize(v []float32) {
	var ss float64
	for _, x := range v {
		ss += float64(x) * float64(x)
	}
	if ss == 0 {
		return
	}
	inv := 1 / math.Sqrt(ss)
	for i, x := range v {
		v[i] = float32(float64(x) * inv)
	}
}

// VocabSize is how many token ids the tokenizer has; an input's ids must
// be below it (or below model.json's vocab_size, when larger).
func (e *Encoder) VocabSize() int { return max(e.tok.VocabSize(), e.cfg.VocabSize) }

// Info describes the encoder as workers announce it.
func (e *Encoder) Info() infer.ModelInfo {
	return infer.ModelInfo{Name: e.name, ContextLength: uint32(e.cfg.ContextLength),
		Encoder: true, EmbeddingSize: uint32(e.hidden), Matryoshka: e.cfg.Matryoshka}
}

// Provider is the execution provider the encoder's session runs on.
func (e *Encoder) Provider() workerconf.Provider { return e.place.provider }

// ChatTemplate is the template model.json names, or plain; an encoder
// formats no chats, but the loop's Model interface asks for one.
func (e *Encoder) ChatTemplate() *tokenize.ChatTemplate { return e.chat }

// Encode turns text into token ids without special tokens.
func (e *Encoder) Encode(text string) []int { return e.tok.Encode(text) }

// EncodeSpecial turns text into token ids with the special tokens the
// tokenizer's post-processor adds (BERT's [CLS] and [SEP], say): the ids
// an input text is embedded as.
func (e *Encoder) EncodeSpecial(text string) []int { return e.tok.EncodeSpecial(text) }

// Piece is the bytes token id stands for; nothing ends a sequence.
func (e *Encoder) Piece(id int) (string, bool) { return e.tok.Piece(id), false }

// errEncoder refuses generation on an encoder.
func (e *Encoder) errEncoder() error {
	return fmt.Errorf("model %s is an encoder: it serves embeddings, not completions", e.name)
}

// Prefill refuses: an encoder generates nothing.
func (e *Encoder) Prefill([]int) ([]float32, [][]byte, error) { return nil, nil, e.errEncoder() }

// Join and Leave do nothing: an encoder has no batch of sequences.
func (e *Encoder) Join([][]byte, int) {}
func (e *Encoder) Leave(int)          {}

// Step refuses: an encoder generates nothing.
func (e *Encoder) Step([]int) ([]float32, error) { return nil, e.errEncoder() }

// KVBytes is 0: an encoder keeps no cache between requests.
func (e *Encoder) KVBytes(int, int) int64 { return 0 }

// Close releases the session.
func (e *Encoder) Close() error {
	if err := e.session.Destroy(); err != nil {
		return fmt.Errorf("model %s: destroy session: %w", e.name, err)
	}
	return nil
}

// OpenEncoder loads the encoder spec names as a worker with settings s
// serves it, as Open does a generative model.
func OpenEncoder(s workerconf.Settings, spec workerconf.Model, log *slog.Logger) (*Encoder, error) {
	if err := InitRuntime(s.ORTLib); err != nil {
		return nil, fmt.Errorf("model %s: %w", spec.Name, err)
	}
	// DeviceKV means nothing to an encoder, which keeps no cache.
	e, err := LoadEncoder(spec.Dir, workerOptions(s, spec, log))
	if err != nil {
		return nil, err
	}
	log.Info("onnx runtime encoder session", "model", e.name, "embedding_size", e.hidden, "pooling", e.cfg.Pooling,
		"normalize", e.cfg.Normalize, "provider", string(e.Provider()), "device", e.place.device, "weights", string(e.weights))
	return e, nil
}
