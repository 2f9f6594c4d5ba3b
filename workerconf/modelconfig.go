package workerconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"h3infer/tokenize"
	"h3infer/toolcall"
)

// Files of a model directory.
const (
	ModelConfigFile = "model.json"
	TokenizerFile   = "tokenizer.json"
	ModelFile       = "model.onnx"
)

// ModelConfig is model.json, the file that sits next to model.onnx and
// tokenizer.json and says how to serve them.
type ModelConfig struct {
	Name          string `json:"name"`
	ContextLength int    `json:"context_length"`
	EOSToken      string `json:"eos_token"`
	// ChatTemplate names one of package tokenize's templates, which then
	// formats chats whatever the model's own files say; empty means the
	// model's own Jinja template, or plain when it has none
	// (LoadChatTemplate).
	ChatTemplate string   `json:"chat_template"`
	StopTokens   []string `json:"stop_tokens"`
	// KVCache is how the graph passes the cache: "concat" (the default,
	// the usual export: present is past with the new positions appended)
	// or "append" (present is the new positions alone, and past is the
	// runtime's whole cache, padding masked out). See ort/batch.go.
	KVCache string `json:"kv_cache"`

	// Optional facts about the graph; when set, ort.LoadModel checks the
	// graph agrees, which catches a model.json copied next to the wrong
	// model.onnx.
	VocabSize int `json:"vocab_size"`
	NumLayers int `json:"num_layers"`
	NumHeads  int `json:"num_heads"`
	HeadDim   int `json:"head_dim"`

	// ToolFormat names how the model writes tool calls (one of package
	// toolcall's formats: hermes, llama3_json); empty means the format
	// its own chat template shows (toolcall.Detect), if any.
	ToolFormat string `json:"tool_format"`

	// Task is what the model does: "generate" (the default; a decoder
	// serving completions) or "embed" (an encoder serving
	// /v1/embeddings: input_ids and attention_mask in, last_hidden_state
	// or a pooled output out; eos_token is then optional).
	Task string `json:"task"`
	// Pooling is how an encoder's last_hidden_state becomes one vector
	// per input: "mean" (the default) over its real tokens, or "cls",
	// its first token's. A graph whose output is already pooled takes
	// "none".
	Pooling string `json:"pooling"`
	// Normalize scales every vector to unit length (L2).
	Normalize bool `json:"normalize"`
	// Matryoshka says the model was trained so that a vector's leading
	// values are an embedding of their own, which OpenAI's dimensions
	// parameter asks for; other encoders refuse it.
	Matryoshka bool `json:"matryoshka"`
	// HiddenSize, when set, is the vectors' length, checked against the
	// graph; the gateway checks dimensions against it before a worker
	// sees the request.
	HiddenSize int `json:"hidden_size"`
}

// model.json task and pooling values.
const (
	TaskGenerate = "generate"
	TaskEmbed    = "embed"
	PoolMean     = "mean"
	PoolCLS      = "cls"
	PoolNone     = "none"
)

// IsEncoder reports whether the model serves embeddings.
func (c ModelConfig) IsEncoder() bool { return c.Task == TaskEmbed }

// model.json kv_cache values.
const (
	KVConcat = "concat"
	KVAppend = "append"
)

// ReadModelConfig decodes dir's model.json strictly: unknown keys and
// trailing data are errors, and every invalid value is reported, each
// naming its key.
func ReadModelConfig(dir string) (ModelConfig, error) {
	path := filepath.Join(dir, ModelConfigFile)
	data, err := os.ReadFile(path)
	if err != nil {
		return ModelConfig{}, fmt.Errorf("read model config: %w", err)
	}
	c, err := parseModelConfig(data)
	if err != nil {
		return ModelConfig{}, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

func parseModelConfig(data []byte) (ModelConfig, error) {
	var c ModelConfig
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return ModelConfig{}, fmt.Errorf("decode: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return ModelConfig{}, errors.New("decode: trailing data after the JSON object")
	}
	var errs []error
	if c.Name == "" {
		errs = append(errs, errors.New("name: must not be empty"))
	}
	if c.ContextLength <= 0 {
		errs = append(errs, fmt.Errorf("context_length: must be > 0, got %d", c.ContextLength))
	}
	errs = append(errs, c.checkTask()...)
	if c.EOSToken == "" && !c.IsEncoder() {
		errs = append(errs, errors.New("eos_token: must not be empty"))
	}
	if _, ok := tokenize.LookupTemplate(c.ChatTemplate); !ok && c.ChatTemplate != "" {
		errs = append(errs, fmt.Errorf("chat_template: must be one of %s, got %q", strings.Join(tokenize.TemplateNames(), ", "), c.ChatTemplate))
	}
	if c.ToolFormat != "" && !toolcall.Known(c.ToolFormat) {
		errs = append(errs, fmt.Errorf("tool_format: must be one of %s, got %q", strings.Join(toolcall.Formats(), ", "), c.ToolFormat))
	}
	switch c.KVCache {
	case "":
		c.KVCache = KVConcat
	case KVConcat, KVAppend:
	default:
		errs = append(errs, fmt.Errorf("kv_cache: must be %q or %q, got %q", KVConcat, KVAppend, c.KVCache))
	}
	for i, s := range c.StopTokens {
		if s == "" {
			errs = append(errs, fmt.Errorf("stop_tokens[%d]: must not be empty", i))
		}
	}
	for _, f := range []struct {
		key string
		v   int
	}{{"vocab_size", c.VocabSize}, {"num_layers", c.NumLayers}, {"num_heads", c.NumHeads}, {"head_dim", c.HeadDim}, {"hidden_size", c.HiddenSize}} {
		if f.v < 0 {
			errs = append(errs, fmt.Errorf("%s: must be >= 0, got %d", f.key, f.v))
		}
	}
	return c, errors.Join(errs...)
}

// LoadChatTemplate returns the template that formats chats for the model
// in dir, whose model.json is c. An operator's explicit choice comes
// first: the template model.json's chat_template names. Else the model's
// own Jinja template, which its authors wrote for it (tokenize.LoadJinja:
// chat_template.jinja or tokenizer_config.json); a broken one is an error
// naming its file, never a silent fallback. Else plain, which suits a
// model trained on no chat format.
//
// The template's ToolFormat is model.json's tool_format, else the one
// its own text shows.
func (c ModelConfig) LoadChatTemplate(dir string) (*tokenize.ChatTemplate, error) {
	t, err := c.loadChatTemplate(dir)
	if err != nil {
		return nil, err
	}
	t.ToolFormat = c.ToolFormat
	if t.ToolFormat == "" {
		t.ToolFormat = toolcall.Detect(t.Source())
	}
	return t, nil
}

func (c ModelConfig) loadChatTemplate(dir string) (*tokenize.ChatTemplate, error) {
	if c.ChatTemplate != "" {
		t, ok := tokenize.LookupTemplate(c.ChatTemplate)
		if !ok {
			return nil, fmt.Errorf("%s: chat_template: must be one of %s, got %q", ModelConfigFile, strings.Join(tokenize.TemplateNames(), ", "), c.ChatTemplate)
		}
		return t, nil
	}
	t, err := tokenize.LoadJinja(dir)
	if err != nil || t != nil {
		return t, err
	}
	t, _ = tokenize.LookupTemplate(tokenize.TemplatePlain)
	return t, nil
}

// checkTask checks task and the keys only an encoder takes, and fills
// their defaults.
func (c *ModelConfig) checkTask() []error {
	var errs []error
	switch c.Task {
	case "":
		c.Task = TaskGenerate
	case TaskGenerate, TaskEmbed:
	default:
		return []error{fmt.Errorf("task: must be %q or %q, got %q", TaskGenerate, TaskEmbed, c.Task)}
	}
	if !c.IsEncoder() {
		for _, k := range []struct {
			key string
			set bool
		}{{"pooling", c.Pooling != ""}, {"normalize", c.Normalize}, {"matryoshka", c.Matryoshka}, {"hidden_size", c.HiddenSize != 0}} {
			if k.set {
				errs = append(errs, fmt.Errorf("%s: only an encoder (task %q) takes it", k.key, TaskEmbed))
			}
		}
		return errs
	}
	switch c.Pooling {
	case "":
		c.Pooling = PoolMean
	case PoolMean, PoolCLS, PoolNone:
	default:
		errs = append(errs, fmt.Errorf("pooling: must be %q, %q or %q, got %q", PoolMean, PoolCLS, PoolNone, c.Pooling))
	}
	return errs
}
