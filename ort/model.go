package ort

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	onnxrt "github.com/yalue/onnxruntime_go"

	"h3infer/constrain"
	"h3infer/infer"
	"h3infer/tokenize"
	"h3infer/workerconf"
)

// Options tunes how LoadModel serves a model directory.
type Options struct {
	// Name is the name the model is served under; empty means the name in
	// model.json.
	Name string
	// IntraOpThreads is ONNX Runtime's intra-op thread count for the
	// session; 0 means 1, which measured as fast as more on small hosts and
	// leaves cores to the other sequences and the gateway.
	IntraOpThreads int

	// Provider is the execution provider; "" is cpu. A GPU provider needs
	// ORTLib, next to which its libraries sit (provider.go).
	Provider workerconf.Provider
	// DeviceID is the GPU a cuda or tensorrt session runs on.
	DeviceID int
	// ORTLib is the path of the loaded libonnxruntime.so.
	ORTLib string
	// GPUMemoryBytes bounds the provider's device memory arena; 0 means
	// no bound of ours.
	GPUMemoryBytes int64
	// DeviceKV keeps the KV cache in the provider's memory between decode
	// steps, through ONNX Runtime IO binding; nil means on exactly when
	// the session runs on a GPU. On the CPU it runs the same code with
	// host memory, which is how tests check it.
	DeviceKV *bool
	// CopyWeights leaves ONNX Runtime's default of repacking the weights
	// of a CPU session into memory of the process's own instead of
	// reading them where they are mapped (weights.go); for measurements.
	CopyWeights bool
	// WeightsCache is the directory of the prepacked weights cache
	// (weightscache.go), where a CPU model with external data gets its
	// weights prepacked and still shared between processes; empty means
	// none: such a model is mapped without prepacking.
	WeightsCache string
	// Log receives the warning when auto falls back to the CPU, and the
	// cache's builds and failures.
	Log *slog.Logger
}

// logger is o.Log, or a logger that drops everything.
func (o Options) logger() *slog.Logger {
	if o.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return o.Log
}

// Model is one loaded model: its ONNX Runtime session, tokenizer and
// serving configuration, and the batch of sequences the generation loop
// advances together (batch.go).
//
// Prefill and the vocabulary's methods are safe for concurrent use, with
// each other and with the batch's: ONNX Runtime allows concurrent runs of
// one session. Join, Leave and Step change the batch and must be called
// one at a time.
type Model struct {
	name    string
	cfg     workerconf.ModelConfig
	tok     *tokenize.Tokenizer
	chat    *tokenize.ChatTemplate
	session *onnxrt.DynamicAdvancedSession
	run     *batch // the batch Join, Leave and Step work on

	hasPositions bool
	layers       int
	heads        int64
	headDim      int64
	vocab        int64 // logits width; 0 when the model leaves it symbolic

	place    placement
	weights  weightMode
	inNames  []string
	outNames []string
	dev      *deviceKV // nil: the cache lives in Go memory (batch.buf)
	// The KV cache is moved as bytes in the graph's own element type
	// (float32, float16 or bfloat16), never converted; logits of a
	// half-precision type are widened to float32 for sampling.
	kvType     onnxrt.TensorElementDataType
	kvSize     int64 // bytes per cache element
	logitsType onnxrt.TensorElementDataType

	eos       int
	stopIDs   map[int]bool // eos and stop_tokens
	inputLen  int          // number of session inputs
	outputLen int          // number of session outputs

	// constrained is the vocabulary of structured outputs, built on the
	// first request that asks for one (Vocabulary).
	constrained struct {
		once  sync.Once
		width int
		v     *constrain.Vocab
		err   error
	}
}

// Files of a model directory.
const (
	modelConfigFile = workerconf.ModelConfigFile
	tokenizerFile   = workerconf.TokenizerFile
	modelFile       = workerconf.ModelFile
)

// LoadModel loads the model in dir: model.json, tokenizer.json and
// model.onnx, and the chat template of chat_template.jinja or
// tokenizer_config.json when model.json names none. InitRuntime must
// have succeeded first. The graph's inputs and outputs are found by name,
// following the usual export signature of decoder-only language models:
// input_ids, attention_mask, optional position_ids and
// past_key_values.N.key/value in; logits and present.N.key/value out.
func LoadModel(dir string, opts Options) (*Model, error) {
	if opts.IntraOpThreads < 0 {
		return nil, fmt.Errorf("load model %s: intra-op threads: must be >= 0, got %d", dir, opts.IntraOpThreads)
	}
	cfg, err := workerconf.ReadModelConfig(dir)
	if err != nil {
		return nil, fmt.Errorf("load model %s: %w", dir, err)
	}
	tok, err := tokenize.Load(filepath.Join(dir, tokenizerFile))
	if err != nil {
		return nil, fmt.Errorf("load model %s: %w", dir, err)
	}
	m := &Model{name: cfg.Name, cfg: cfg, tok: tok, stopIDs: map[int]bool{}}
	if opts.Name != "" {
		m.name = opts.Name
	}
	var errs []error
	if id, ok := tok.TokenID(cfg.EOSToken); ok {
		m.eos = id
		m.stopIDs[id] = true
	} else {
		errs = append(errs, fmt.Errorf("%s: eos_token: %q is not a token of %s", modelConfigFile, cfg.EOSToken, tokenizerFile))
	}
	for i, s := range cfg.StopTokens {
		if id, ok := tok.TokenID(s); ok {
			m.stopIDs[id] = true
		} else {
			errs = append(errs, fmt.Errorf("%s: stop_tokens[%d]: %q is not a token of %s", modelConfigFile, i, s, tokenizerFile))
		}
	}
	if ids, err := workerconf.ReadGenerationStops(dir); err != nil {
		errs = append(errs, err)
	} else {
		for i, id := range ids {
			if id >= tok.VocabSize() {
				errs = append(errs, fmt.Errorf("%s: eos_token_id[%d]: %d is not a token of %s", workerconf.GenerationConfigFile, i, id, tokenizerFile))
				continue
			}
			m.stopIDs[id] = true
		}
	}
	// The template's markers must be tokens, or they would reach the model
	// spelled out as characters; the token that ends its turns stops
	// generation, as the model's own eos does.
	chat, err := cfg.LoadChatTemplate(dir)
	if err != nil {
		errs = append(errs, err)
	} else {
		m.chat = chat
		for _, mark := range chat.Markers {
			switch {
			case tok.IsAdded(mark):
			case chat.File != "":
				errs = append(errs, fmt.Errorf("%s: bos_token or eos_token: %q, which the chat template writes, is not among the added tokens of %s", tokenize.TokenizerConfigFile, mark, tokenizerFile))
			default:
				errs = append(errs, fmt.Errorf("%s: chat_template: %q writes %q, which is not among the added tokens of %s", modelConfigFile, chat.Name, mark, tokenizerFile))
			}
		}
		if id, ok := tok.TokenID(chat.EndOfTurn); ok && chat.EndOfTurn != "" {
			m.stopIDs[id] = true
		}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("load model %s: %w", dir, errors.Join(errs...))
	}

	if opts.Provider != "" && opts.Provider != workerconf.ProviderCPU && opts.ORTLib == "" {
		return nil, fmt.Errorf("load model %s: provider %s: %w", dir, opts.Provider, errNoLibrary)
	}
	place, err := choosePlacement(opts, opts.Log)
	if err != nil {
		return nil, fmt.Errorf("load model %s: %w", dir, err)
	}
	if err := m.createSession(dir, opts, place); err != nil {
		if opts.Provider != workerconf.ProviderAuto || !place.provider.OnGPU() {
			return nil, err
		}
		// The libraries loaded but the device did not (no GPU, a driver
		// too old): auto means the CPU then.
		if opts.Log != nil {
			opts.Log.Warn("cuda session failed, model runs on the cpu", "model", m.name, "err", err)
		}
		place = placement{provider: workerconf.ProviderCPU}
		if err := m.createSession(dir, opts, place); err != nil {
			return nil, err
		}
	}
	m.place = place
	deviceKV := place.provider.OnGPU() && cfg.KVCache == workerconf.KVConcat
	if opts.DeviceKV != nil {
		deviceKV = *opts.DeviceKV
	}
	if deviceKV && cfg.KVCache == workerconf.KVAppend {
		// The device-resident cache keeps each step's present as the next
		// past, which an append graph's present is not.
		m.session.Destroy()
		return nil, fmt.Errorf("load model %s: device-resident KV cache: not available with %s kv_cache %q", dir, modelConfigFile, workerconf.KVAppend)
	}
	if deviceKV {
		if m.dev, err = newDeviceKV(m, opts.ORTLib, place); err != nil {
			m.session.Destroy()
			return nil, fmt.Errorf("load model %s: device-resident KV cache: %w", dir, err)
		}
	}
	m.run = m.newBatch()
	return m, nil
}

// createSession makes the model's session on place.
func (m *Model) createSession(dir string, opts Options, place placement) error {
	path := filepath.Join(dir, modelFile)
	if m.inNames == nil {
		// Inspecting the graph needs no provider; done once, so that a
		// fallback to the CPU does not check the signature twice.
		ins, outs, err := inspect(path)
		if err != nil {
			return fmt.Errorf("load model %s: inspect %s: %w", dir, modelFile, err)
		}
		inNames, outNames, err := m.bindSignature(ins, outs)
		if err != nil {
			return fmt.Errorf("load model %s: %s: %w", dir, modelFile, err)
		}
		if err := m.checkConfigShape(); err != nil {
			return fmt.Errorf("load model %s: %w", dir, err)
		}
		m.inNames, m.outNames = inNames, outNames
		m.inputLen, m.outputLen = len(inNames), len(outNames)
	}
	s, mode, err := newSession(dir, opts, place, m.inNames, m.outNames)
	if err != nil {
		return fmt.Errorf("load model %s: %w", dir, err)
	}
	m.session, m.weights = s, mode
	return nil
}

// bindSignature checks the graph's inputs and outputs and returns them in
// the order forward passes values: input_ids, attention_mask,
// [position_ids], past key/value per layer; logits, present key/value per
// layer.
func (m *Model) bindSignature(ins, outs []onnxrt.InputOutputInfo) ([]string, []string, error) {
	byName := map[string]onnxrt.InputOutputInfo{}
	pastLayers := map[int]int{} // layer -> how many of key, value seen
	for _, in := range ins {
		byName[in.Name] = in
		if n, ok := pastLayer(in.Name); ok {
			pastLayers[n]++
		}
	}
	var errs []error
	for _, name := range []string{"input_ids", "attention_mask"} {
		in, ok := byName[name]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("input %q: missing", name))
		case in.DataType != onnxrt.TensorElementDataTypeInt64:
			errs = append(errs, fmt.Errorf("input %q: must be int64, got %s", name, in.DataType))
		}
	}
	if in, ok := byName["position_ids"]; ok {
		m.hasPositions = true
		if in.DataType != onnxrt.TensorElementDataTypeInt64 {
			errs = append(errs, fmt.Errorf("input %q: must be int64, got %s", "position_ids", in.DataType))
		}
	}
	m.layers = len(pastLayers)
	if m.layers == 0 {
		errs = append(errs, errors.New("no past_key_values.N.key/value inputs: the model must take a KV cache"))
	}
	outByName := map[string]onnxrt.InputOutputInfo{}
	for _, out := range outs {
		outByName[out.Name] = out
	}
	if lg, ok := outByName["logits"]; !ok {
		errs = append(errs, errors.New("output \"logits\": missing"))
	} else if _, ok := floatSize(lg.DataType); !ok {
		errs = append(errs, fmt.Errorf("output \"logits\": must be float32, float16 or bfloat16, got %s", lg.DataType))
	} else {
		m.logitsType = lg.DataType
		if d := lg.Dimensions; len(d) == 3 && d[2] > 0 {
			m.vocab = d[2]
		} else if lg.DataType != onnxrt.TensorElementDataTypeFloat {
			// Half-precision outputs must be preallocated: onnxruntime_go
			// copies a runtime-allocated one of these types by element
			// count, not bytes, losing half of it.
			if m.cfg.VocabSize <= 0 {
				errs = append(errs, fmt.Errorf("output \"logits\": %s with a symbolic vocabulary dimension needs vocab_size in %s", lg.DataType, modelConfigFile))
			} else {
				m.vocab = int64(m.cfg.VocabSize)
			}
		}
	}
	if len(errs) > 0 {
		return nil, nil, errors.Join(errs...)
	}

	inNames := []string{"input_ids", "attention_mask"}
	if m.hasPositions {
		inNames = append(inNames, "position_ids")
	}
	outNames := []string{"logits"}
	for layer := range m.layers {
		for _, kind := range []string{"key", "value"} {
			in, ok := byName[fmt.Sprintf("past_key_values.%d.%s", layer, kind)]
			if !ok {
				errs = append(errs, fmt.Errorf("input \"past_key_values.%d.%s\": missing (layers must be numbered from 0)", layer, kind))
				continue
			}
			outName := fmt.Sprintf("present.%d.%s", layer, kind)
			if out, ok := outByName[outName]; !ok {
				errs = append(errs, fmt.Errorf("output %q: missing", outName))
			} else if out.DataType != in.DataType {
				errs = append(errs, fmt.Errorf("output %q: is %s but %q is %s; the cache must keep one type", outName, out.DataType, in.Name, in.DataType))
			}
			if err := m.checkKV(in); err != nil {
				errs = append(errs, err)
			}
			inNames = append(inNames, in.Name)
			outNames = append(outNames, outName)
		}
	}
	if len(inNames) != len(ins) {
		for _, in := range ins {
			if !slices.Contains(inNames, in.Name) {
				errs = append(errs, fmt.Errorf("input %q: not part of the decoder signature", in.Name))
			}
		}
	}
	if len(errs) > 0 {
		return nil, nil, errors.Join(errs...)
	}
	return inNames, outNames, nil
}

// checkConfigShape compares the optional shape facts of model.json with
// the graph.
func (m *Model) checkConfigShape() error {
	var errs []error
	check := func(key string, want int, got int64) {
		if want != 0 && got != 0 && int64(want) != got {
			errs = append(errs, fmt.Errorf("%s: %s: %d, but %s has %d", modelConfigFile, key, want, modelFile, got))
		}
	}
	check("vocab_size", m.cfg.VocabSize, m.vocab)
	check("num_layers", m.cfg.NumLayers, int64(m.layers))
	check("num_heads", m.cfg.NumHeads, m.heads)
	check("head_dim", m.cfg.HeadDim, m.headDim)
	return errors.Join(errs...)
}

// checkKV reads heads, head_dim and the element type from a
// past_key_values input shaped [batch, heads, past, head_dim]; all three
// must be fixed and equal across layers.
func (m *Model) checkKV(in onnxrt.InputOutputInfo) error {
	size, ok := floatSize(in.DataType)
	if !ok {
		return fmt.Errorf("input %q: must be float32, float16 or bfloat16, got %s", in.Name, in.DataType)
	}
	if m.kvSize == 0 {
		m.kvType, m.kvSize = in.DataType, size
	} else if in.DataType != m.kvType {
		return fmt.Errorf("input %q: is %s but layer 0's cache is %s", in.Name, in.DataType, m.kvType)
	}
	d := in.Dimensions
	if len(d) != 4 || d[1] <= 0 || d[3] <= 0 {
		return fmt.Errorf("input %q: shape %v: want [batch, heads, past, head_dim] with fixed heads and head_dim", in.Name, d)
	}
	if m.heads == 0 {
		m.heads, m.headDim = d[1], d[3]
	} else if d[1] != m.heads || d[3] != m.headDim {
		return fmt.Errorf("input %q: shape %v differs from layer 0's heads %d, head_dim %d", in.Name, d, m.heads, m.headDim)
	}
	return nil
}

// floatSize is the size in bytes of the floating-point element types a
// model's cache and logits may have.
func floatSize(t onnxrt.TensorElementDataType) (int64, bool) {
	switch t {
	case onnxrt.TensorElementDataTypeFloat:
		return 4, true
	case onnxrt.TensorElementDataTypeFloat16, onnxrt.TensorElementDataTypeBFloat16:
		return 2, true
	}
	return 0, false
}

// pastLayer parses "past_key_values.N.key" or ".value" and returns N.
func pastLayer(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, "past_key_values.")
	if !ok {
		return 0, false
	}
	num, kind, ok := strings.Cut(rest, ".")
	if !ok || (kind != "key" && kind != "value") {
		return 0, false
	}
	n, err := strconv.Atoi(num)
	if err != nil || n < 0 || n > 1<<16 || strconv.Itoa(n) != num {
		return 0, false
	}
	return n, true
}

// Provider is the execution provider the model's session runs on, after
// any fallback of auto.
func (m *Model) Provider() workerconf.Provider { return m.place.provider }

// DeviceKV reports whether the model keeps its KV cache in the provider's
// memory between decode steps.
func (m *Model) DeviceKV() bool { return m.dev != nil }

// Info describes the model as workers announce it.
func (m *Model) Info() infer.ModelInfo {
	return infer.ModelInfo{Name: m.name, ContextLength: uint32(m.cfg.ContextLength)}
}

// ChatTemplate formats a chat as this model's prompt: the template
// model.json names, else the model's own Jinja template, else plain
// (workerconf.ModelConfig.LoadChatTemplate).
func (m *Model) ChatTemplate() *tokenize.ChatTemplate { return m.chat }

// Encode turns prompt text into the model's token ids.
func (m *Model) Encode(text string) []int { return m.tok.Encode(text) }

// EncodeSpecial turns text into token ids with the special tokens the
// tokenizer's post-processor adds (a BOS, say).
func (m *Model) EncodeSpecial(text string) []int { return m.tok.EncodeSpecial(text) }

// Piece is the bytes token id adds to a generated text, and whether it
// ends a sequence: eos_token, stop_tokens, generation_config.json's
// eos_token_id or the chat template's end of turn. An end token's piece
// is its spelling, which is never part of an answer. Any other special
// token adds nothing: generated text skips special tokens, as Hugging
// Face's decode(skip_special_tokens=True) and vLLM do by default.
func (m *Model) Piece(id int) (string, bool) {
	stop := m.stopIDs[id]
	if m.tok.IsSpecial(id) && !stop {
		return "", false
	}
	return m.tok.Piece(id), stop
}

// SpecialID is the id of the tokenizer's special token s, whose piece
// Piece leaves out: a request with tools spells its family's markers.
func (m *Model) SpecialID(s string) (int, bool) { return m.tok.SpecialID(s) }

// Vocabulary is the model's vocabulary as constrained decoding walks it,
// width tokens wide (the logits' width, which may exceed the
// tokenizer's), built once for every request of the model to share: a
// trie of 128k pieces takes tens of milliseconds, and its cache of masks
// serves every request with the same schema.
func (m *Model) Vocabulary(width int) (*constrain.Vocab, error) {
	c := &m.constrained
	c.once.Do(func() { c.width = width; c.v, c.err = constrain.NewVocab(width, m.Piece) })
	if c.err == nil && width != c.width {
		return nil, fmt.Errorf("logits %d wide, the vocabulary %d", width, c.width)
	}
	return c.v, c.err
}

// Join adds a prompt prefilled by Prefill, n tokens whose cache is kv,
// to the model's batch as its last row.
func (m *Model) Join(kv [][]byte, n int) { m.run.join(kv, n) }

// Leave removes row r from the batch; the last row takes its number.
func (m *Model) Leave(r int) { m.run.leave(r) }

// Step feeds row r of the batch the token next[r], all rows in one run,
// and returns their logits, row r's at [r*V, (r+1)*V) for V the
// vocabulary size, valid until the next Step.
func (m *Model) Step(next []int) ([]float32, error) { return m.run.step(next) }

// Close drops the batch and releases the ONNX Runtime session.
func (m *Model) Close() error {
	m.run.close()
	m.dev.close()
	if err := m.session.Destroy(); err != nil {
		return fmt.Errorf("model %s: destroy session: %w", m.name, err)
	}
	return nil
}
