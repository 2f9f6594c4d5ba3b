// Package onnxgen writes the models h3infer serves when no real language
// model is at hand: an ONNX decoder-only transformer with the usual LLM
// export signature, a byte-level tokenizer.json, and h3infer's model.json.
//
// The demo model carries the character statistics of a short embedded text
// in its weights, so greedy decoding produces readable English, and the
// context it needs reaches it only through attention over the KV cache: a
// serving bug in cache handling, padding or positions changes the text.
// Random models share the same graph at any size, for load measurements.
//
// The ONNX protobuf is encoded by hand with protowire. The package owns only
// file generation and must not import ONNX Runtime or any other h3infer
// package; tests load its output with the real ONNX Runtime.
package onnxgen

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
)

// File names written by Write.
const (
	ModelFile     = "model.onnx"
	DataFile      = "model.onnx.data" // external initializers (Options.ExternalData)
	TokenizerFile = "tokenizer.json"
	ConfigFile    = "model.json"
)

// KV cache layouts (Options.KVCache, model.json kv_cache).
const (
	KVCacheConcat = "concat"
	KVCacheAppend = "append"
)

// Defaults for zero Options fields. The layer, head and hidden defaults are
// the demo model's fixed shape.
const (
	DefaultLayers  = demoLayers
	DefaultHeads   = demoHeads
	DefaultHidden  = demoHidden
	DefaultContext = 2048
	DefaultVocab   = demoVocab
)

// Bounds checked by Options.validate; they keep files well under protobuf's
// 2 GiB message limit and rotary tables reasonable.
const (
	maxLayers    = 64
	maxHidden    = 8192
	maxContext   = 1 << 16
	maxVocab     = 1 << 19
	maxFileBytes = 1 << 30
)

// External data layout: initializers smaller than externalMin stay inline
// (the threshold of ONNX's own converter), and offsets are aligned to
// dataAlign, the mapping granularity on every platform ONNX Runtime runs on
// (64 KiB on Windows, the page on Linux).
const (
	externalMin = 1024
	dataAlign   = 64 << 10
)

// Options selects the model Write produces. A zero field means its default.
type Options struct {
	// Layers is the number of transformer blocks (default 2).
	Layers int
	// Heads is the number of attention heads; Hidden/Heads is the head
	// dimension, which must be even for rotary positions (default 2).
	Heads int
	// Hidden is the residual width (default 128). Random models use an MLP
	// four times as wide.
	Hidden int
	// Context is the number of positions the model supports: position ids
	// must be below it (default 2048). It is the context_length in model.json.
	Context int
	// Vocab is the number of token ids (default 257: 256 bytes and
	// <|endoftext|>). Random models may use more; the extra ids appear in
	// tokenizer.json as reserved special tokens.
	Vocab int
	// Seed makes random weights reproducible; the same Options always give
	// byte-identical files.
	Seed int64
	// Random selects seeded random weights of any size. When false, Write
	// produces the demo n-gram model, whose Layers, Heads, Hidden and Vocab
	// are fixed at the defaults; only Context may change (16 to 65536).
	Random bool

	// The options below vary the export's shape the way real exports vary,
	// so that the backend can be tested against each.

	// NoPositionIDs leaves position_ids out of the graph, as GPT-2 style
	// exports do; the graph then takes each new token's position from the
	// running count of attention_mask (its cumulative sum minus one), which
	// equals what the backend would pass, so the text does not change.
	NoPositionIDs bool
	// KVType is the element type of the past_key_values inputs and present
	// outputs: "" or "float32", "float16" or "bfloat16". A narrow cache is
	// cast around the attention, as half-precision exports do.
	KVType string
	// LogitsType is the element type of logits, with the same choices.
	LogitsType string
	// KVCache is how the cache passes through the graph: "" or "concat",
	// the usual export, where present is past and the new positions
	// concatenated; or "append", where present holds only the new
	// positions and past is the caller's whole cache, padding masked out,
	// read where it lies (model.json kv_cache). Append spares every
	// decode step a copy of the cache; see ort/batch.go.
	KVCache string
	// Merges is how many byte-level BPE merges to learn from the corpus for
	// tokenizer.json (fewer when no pair repeats). Merged tokens follow
	// <|endoftext|>. The demo model reads them as unknown tokens and never
	// produces them; random models may produce any id.
	Merges int
	// Corpus replaces the demo model's embedded text (and is the text
	// merges are learned from). It may use at most 64 distinct bytes.
	Corpus string
	// SpecialTokens are added to tokenizer.json as special tokens after the
	// merged tokens, such as the markers of a chat template.
	SpecialTokens []string
	// ChatTemplate is model.json's chat_template; empty means "plain".
	ChatTemplate string
	// ExternalData writes every initializer of at least externalMin bytes
	// to DataFile beside ModelFile, the way large exports keep their
	// weights, instead of inside the protobuf. Each starts at a multiple
	// of dataAlign, so ONNX Runtime can map it from the file rather than
	// copy it, and worker processes of one model then share its pages.
	ExternalData bool
	// Tokenizer is a directory holding a real model's tokenizer.json, and
	// optionally its tokenizer_config.json and chat_template.jinja, which
	// are copied beside the random weights instead of the generated
	// byte-level tokenizer; the vocabulary then sets the logits' width.
	// It needs Random, and excludes Merges, SpecialTokens and
	// ChatTemplate: the model's own files say all of that.
	Tokenizer string
}

// DefaultOptions returns the demo model's options.
func DefaultOptions() Options {
	return Options{
		Layers:  DefaultLayers,
		Heads:   DefaultHeads,
		Hidden:  DefaultHidden,
		Context: DefaultContext,
		Vocab:   DefaultVocab,
	}
}

// withDefaults fills zero fields.
func (o Options) withDefaults() Options {
	d := DefaultOptions()
	if o.Layers == 0 {
		o.Layers = d.Layers
	}
	if o.Heads == 0 {
		o.Heads = d.Heads
	}
	if o.Hidden == 0 {
		o.Hidden = d.Hidden
	}
	if o.Context == 0 {
		o.Context = d.Context
	}
	if o.Vocab == 0 {
		o.Vocab = d.Vocab
	}
	return o
}

// validate reports every problem at once; o must have defaults filled.
func (o Options) validate() error {
	var errs []error
	check := func(ok bool, format string, args ...any) {
		if !ok {
			errs = append(errs, fmt.Errorf(format, args...))
		}
	}
	check(o.Layers >= 1 && o.Layers <= maxLayers, "layers: must be in [1, %d], got %d", maxLayers, o.Layers)
	check(o.Heads >= 1, "heads: must be >= 1, got %d", o.Heads)
	check(o.Hidden >= 2 && o.Hidden <= maxHidden, "hidden: must be in [2, %d], got %d", maxHidden, o.Hidden)
	if o.Heads >= 1 && o.Hidden >= 2 {
		check(o.Hidden%o.Heads == 0 && (o.Hidden/o.Heads)%2 == 0,
			"hidden: must be a multiple of 2*heads (even head dimension), got hidden %d, heads %d", o.Hidden, o.Heads)
	}
	check(o.Context >= 16 && o.Context <= maxContext, "context: must be in [16, %d], got %d", maxContext, o.Context)
	check(o.Vocab >= DefaultVocab && o.Vocab <= maxVocab, "vocab: must be in [%d, %d], got %d", DefaultVocab, maxVocab, o.Vocab)
	if !o.Random {
		check(o.Layers == demoLayers, "layers: the demo model has %d, got %d (set Random for other shapes)", demoLayers, o.Layers)
		check(o.Heads == demoHeads, "heads: the demo model has %d, got %d (set Random for other shapes)", demoHeads, o.Heads)
		check(o.Hidden == demoHidden, "hidden: the demo model has %d, got %d (set Random for other shapes)", demoHidden, o.Hidden)
		check(o.Vocab == demoVocab, "vocab: the demo model has %d, got %d (set Random for other shapes)", demoVocab, o.Vocab)
	}
	for _, f := range []struct{ key, v string }{{"kv_type", o.KVType}, {"logits_type", o.LogitsType}} {
		_, ok := floatType(f.v)
		check(ok, "%s: must be \"float32\", \"float16\" or \"bfloat16\", got %q", f.key, f.v)
	}
	check(o.KVCache == "" || o.KVCache == KVCacheConcat || o.KVCache == KVCacheAppend,
		"kv_cache: must be %q or %q, got %q", KVCacheConcat, KVCacheAppend, o.KVCache)
	check(o.Merges >= 0 && o.Merges <= maxVocab, "merges: must be in [0, %d], got %d", maxVocab, o.Merges)
	for i, t := range o.SpecialTokens {
		check(t != "", "special_tokens[%d]: must not be empty", i)
	}
	if o.Tokenizer != "" {
		check(o.Random, "tokenizer: needs Random (the demo model's weights are for its own byte tokens)")
		check(o.Merges == 0 && len(o.SpecialTokens) == 0 && o.ChatTemplate == "",
			"tokenizer: a model's own tokenizer excludes merges, special tokens and a named chat template")
	}
	if len(errs) == 0 && o.Random {
		if n := randomShape(o).bytes(); n > maxFileBytes {
			errs = append(errs, fmt.Errorf("model would take about %d MiB, more than the %d MiB limit", n>>20, maxFileBytes>>20))
		}
	}
	return errors.Join(errs...)
}

// floatType maps the element type names Options accepts to TensorProto
// data types.
func floatType(name string) (int32, bool) {
	switch name {
	case "", "float32":
		return dtypeFloat, true
	case "float16":
		return dtypeFloat16, true
	case "bfloat16":
		return dtypeBFloat16, true
	}
	return 0, false
}

// Config is model.json, the description h3infer's worker reads next to
// model.onnx.
type Config struct {
	// Name identifies the model: "demo", or "random" for random weights.
	Name string `json:"name"`
	// ContextLength is the most positions a sequence may use, prompt and
	// generated tokens together.
	ContextLength int `json:"context_length"`
	// EOSToken ends generation; it is a special token in tokenizer.json.
	EOSToken string `json:"eos_token"`
	// ChatTemplate names how chat messages become a prompt; "plain" joins
	// their contents. Absent when the model brings its own template in
	// tokenizer_config.json.
	ChatTemplate string `json:"chat_template,omitempty"`
	// StopTokens end generation when produced.
	StopTokens []string `json:"stop_tokens,omitempty"`
	// KVCache is "append" when present holds only the new positions;
	// absent for the usual concatenation.
	KVCache string `json:"kv_cache,omitempty"`
	// VocabSize is the last dimension of logits.
	VocabSize int `json:"vocab_size"`
	// NumLayers is the number of past_key_values.N / present.N pairs.
	NumLayers int `json:"num_layers"`
	// NumHeads and HeadDim are dims 1 and 3 of every cache tensor.
	NumHeads int `json:"num_heads"`
	HeadDim  int `json:"head_dim"`
}

// Write creates dir if needed and writes model.onnx, tokenizer.json and
// model.json into it. Each file is written to a temporary name in dir and
// renamed into place, so a reader never sees a partial file.
func Write(dir string, opts Options) error {
	o := opts.withDefaults()
	if err := o.validate(); err != nil {
		return fmt.Errorf("onnxgen: invalid options: %w", err)
	}
	var (
		s    shape
		w    *weights
		name = "demo"
		doc  = "h3infer demo: character n-gram statistics of a short text, as a transformer"
		text = corpus
	)
	if o.Corpus != "" {
		text = o.Corpus
	}
	spec := tokenizerSpec{special: o.SpecialTokens}
	if o.Merges > 0 {
		spec.merges, spec.symbols = learnMerges(text, o.Merges)
	}
	var own *ownTokenizer
	if o.Tokenizer != "" {
		var err error
		if own, err = readOwnTokenizer(o.Tokenizer); err != nil {
			return fmt.Errorf("onnxgen: %w", err)
		}
		o.Vocab = own.vocab
		if err := o.validate(); err != nil {
			return fmt.Errorf("onnxgen: invalid options: %w", err)
		}
	}
	if o.Random {
		o.Vocab = max(o.Vocab, spec.size())
		s, w = randomWeights(o)
		name = "random"
		doc = fmt.Sprintf("h3infer random model, seed %d", o.Seed)
	} else {
		var err error
		if s, w, err = demoWeights(o.Context, text, spec.size()); err != nil {
			return fmt.Errorf("onnxgen: demo weights: %w", err)
		}
	}
	s.noPositions = o.NoPositionIDs
	s.kvType, _ = floatType(o.KVType)
	s.logitsType, _ = floatType(o.LogitsType)
	s.appendKV = o.KVCache == KVCacheAppend
	chat := o.ChatTemplate
	if chat == "" {
		chat = "plain"
	}
	m := model{
		producer: "h3infer-onnxgen",
		version:  "1",
		doc:      doc,
		metadata: [][2]string{{"h3infer.model", name}},
		graph:    buildGraph(s, w),
	}
	cfg := Config{
		Name:          name,
		ContextLength: s.context,
		EOSToken:      EndOfText,
		ChatTemplate:  chat,
		StopTokens:    []string{EndOfText},
		KVCache:       map[bool]string{true: KVCacheAppend}[s.appendKV],
		VocabSize:     s.vocab,
		NumLayers:     s.layers,
		NumHeads:      s.heads,
		HeadDim:       s.headDim,
	}
	if own != nil {
		cfg.EOSToken, cfg.ChatTemplate, cfg.StopTokens = own.eos, "", nil
	}
	cfgJSON, err := marshalJSON(cfg)
	if err != nil {
		return fmt.Errorf("onnxgen: encode %s: %w", ConfigFile, err)
	}
	var files []namedFile
	if own != nil {
		files = own.files
	} else {
		tok, err := tokenizerJSON(spec, s.vocab)
		if err != nil {
			return fmt.Errorf("onnxgen: %w", err)
		}
		files = append(files, namedFile{TokenizerFile, tok})
	}
	files = append(files, namedFile{ConfigFile, cfgJSON})
	if o.ExternalData {
		// Before model.onnx, so that a reader never sees a model whose
		// data file is not there yet.
		files = append(files, namedFile{DataFile, externalize(&m.graph)})
	}
	files = append(files, namedFile{ModelFile, m.marshal()})
	return writeFiles(dir, files)
}

// writeFiles creates dir if needed and writes files into it in order,
// each to a temporary name renamed into place.
func writeFiles(dir string, files []namedFile) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("onnxgen: create %s: %w", dir, err)
	}
	for _, f := range files {
		if err := writeFileAtomic(filepath.Join(dir, f.name), f.data); err != nil {
			return fmt.Errorf("onnxgen: %w", err)
		}
	}
	return nil
}

// externalize moves g's large initializers out of the protobuf and returns
// the data file's bytes: each initializer's raw bytes at an aligned offset,
// zeros between.
func externalize(g *graph) []byte {
	var size int64
	for i := range g.inits {
		if n := int64(len(g.inits[i].raw)); n >= externalMin {
			size = alignUp(size, dataAlign) + n
		}
	}
	data := make([]byte, 0, size)
	for i := range g.inits {
		t := &g.inits[i]
		if len(t.raw) < externalMin {
			continue
		}
		off := alignUp(int64(len(data)), dataAlign)
		data = append(data, make([]byte, off-int64(len(data)))...)
		data = append(data, t.raw...)
		t.ext = &externalRef{location: DataFile, offset: off, length: int64(len(t.raw))}
		t.raw = nil
	}
	return data
}

func alignUp(n, a int64) int64 { return (n + a - 1) / a * a }

// marshalJSON indents v and leaves <, > and & as they are: special tokens
// should read as written.
func marshalJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		done = true
		return fmt.Errorf("rename into %s: %w", path, err)
	}
	done = true
	return nil
}

func randomShape(o Options) shape {
	return shape{
		vocab:   o.Vocab,
		layers:  o.Layers,
		heads:   o.Heads,
		hidden:  o.Hidden,
		headDim: o.Hidden / o.Heads,
		mlp:     4 * o.Hidden,
		context: o.Context,
	}
}

// bytes estimates the encoded model size from its float parameters.
func (s shape) bytes() int64 {
	h, m := int64(s.hidden), int64(s.mlp)
	perLayer := 4*h*h + 2*h*m + m + 3*h
	total := int64(s.layers)*perLayer + 2*int64(s.vocab)*h + h + 2*int64(s.context)*int64(s.headDim)
	return 4 * total
}

// randomWeights draws weights from a PCG stream seeded by o.Seed, scaled by
// 1/sqrt(fan_in) so activations keep a sensible range at any width; rotary
// tables use the common base of 10000.
func randomWeights(o Options) (shape, *weights) {
	s := randomShape(o)
	w := newWeights(s)
	rng := rand.New(rand.NewPCG(uint64(o.Seed), 0x68336966)) // fixed stream id: "h3if"
	fill := func(v []float32, std float64) {
		for i := range v {
			v[i] = float32(rng.NormFloat64() * std)
		}
	}
	fill(w.embed, 1)
	for i := range w.layers {
		lw := &w.layers[i]
		in := 1 / math.Sqrt(float64(s.hidden))
		fill(lw.wq, in)
		fill(lw.wk, in)
		fill(lw.wv, in)
		fill(lw.wo, in)
		fill(lw.w1, in)
		fill(lw.b1, 0.02)
		fill(lw.w2, 1/math.Sqrt(float64(s.mlp)))
		fill(lw.b2, 0.02)
	}
	fill(w.lmHead, 1/math.Sqrt(float64(s.hidden)))
	freqs := make([]float64, s.headDim/2)
	for i := range freqs {
		freqs[i] = math.Pow(10000, -2*float64(i)/float64(s.headDim))
	}
	w.setRotary(s, freqs)
	return s, w
}
