// Package toolcall knows how model families write function calls in
// their text: which family a chat template belongs to, how to find the
// calls in a completion as it streams (Parser), and the text around a
// call's arguments that constrained decoding forces (Syntax). It speaks
// only infer's vocabulary and knows nothing of models, HTTP or the ring.
package toolcall

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// Families of tool call syntax, as model.json's tool_format names them.
const (
	// Hermes writes each call as
	// <tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>:
	// Qwen 2.5 and 3, the Hermes models and many fine-tunes that follow
	// them.
	Hermes = "hermes"
	// Llama3JSON writes the answer as one JSON object
	// {"name": NAME, "parameters": {...}} (Llama 3.1, 3.2 and 3.3's
	// JSON tool calling), optionally after <|python_tag|>; several calls
	// are separated by semicolons.
	Llama3JSON = "llama3_json"
	// DeepSeekV3 writes its calls in a section of marker tokens:
	// <｜tool▁calls▁begin｜>, then for each call
	// <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{...}\n```<｜tool▁call▁end｜>,
	// then <｜tool▁calls▁end｜> (DeepSeek V3 and R1).
	DeepSeekV3 = "deepseek_v3"
	// Mistral writes [TOOL_CALLS] and a JSON list of
	// {"name": NAME, "arguments": {...}} (Mistral 7B v0.3, Mistral
	// Small and Large, Mixtral 8x22B).
	Mistral = "mistral"
)

// The markers of the families; those of DeepSeek V3 and Mistral are
// special tokens in some of their tokenizers.
const (
	hermesOpen         = "<tool_call>"
	hermesClose        = "</tool_call>"
	mistralOpen        = "[TOOL_CALLS]"
	deepseekSection    = "<｜tool▁calls▁begin｜>"
	deepseekSectionEnd = "<｜tool▁calls▁end｜>"
	deepseekBegin      = "<｜tool▁call▁begin｜>"
	deepseekEnd        = "<｜tool▁call▁end｜>"
	deepseekSep        = "<｜tool▁sep｜>"
)

var deepseekMarkers = []string{deepseekSection, deepseekSectionEnd, deepseekBegin, deepseekEnd, deepseekSep}

// Formats lists the families in the order docs and errors give them.
func Formats() []string { return []string{Hermes, Llama3JSON, DeepSeekV3, Mistral} }

// Markers are the texts of format's call syntax that a tokenizer may
// hold as special tokens: the worker spells them for the parser,
// although generated text otherwise skips special tokens, and the
// parser keeps them out of content.
func Markers(format string) []string {
	switch format {
	case Hermes:
		return []string{hermesOpen, hermesClose}
	case DeepSeekV3:
		return deepseekMarkers
	case Mistral:
		return []string{mistralOpen}
	}
	return nil
}

// Known reports whether f names a family.
func Known(f string) bool { return slices.Contains(Formats(), f) }

// Detect names the family a chat template's source writes calls in, ""
// when it shows none: the markers a family's template teaches its model
// to write are in the template's own text.
func Detect(template string) string {
	switch {
	case strings.Contains(template, hermesOpen):
		return Hermes
	case strings.Contains(template, deepseekSection):
		return DeepSeekV3
	case strings.Contains(template, mistralOpen):
		return Mistral
	case strings.Contains(template, "<|python_tag|>"),
		strings.Contains(template, "ipython") && strings.Contains(template, `"parameters": `):
		return Llama3JSON
	}
	return ""
}

// Syntax is the text a family writes around the arguments of one call of
// the function name, for constrained decoding: Prefix, the arguments as a
// JSON object, Suffix. The arguments object is the last member of the
// call's object, so the Suffix closes it.
func Syntax(format, name string) (prefix, suffix string, err error) {
	q, _ := json.Marshal(name)
	switch format {
	case Hermes:
		return `<tool_call>` + "\n" + `{"name": ` + string(q) + `, "arguments": `, "}\n</tool_call>", nil
	case Llama3JSON:
		return `{"name": ` + string(q) + `, "parameters": `, "}", nil
	case Mistral:
		return mistralOpen + `[{"name": ` + string(q) + `, "arguments": `, "}]", nil
	case DeepSeekV3:
		return deepseekSection + deepseekBegin + "function" + deepseekSep + name + "\n```json\n",
			"\n```" + deepseekEnd + deepseekSectionEnd, nil
	}
	return "", "", fmt.Errorf("toolcall: unknown format %q", format)
}

// NewID is a fresh call id in OpenAI's form, call_ and 24 random
// characters.
func NewID() string { return "call_" + rand.Text()[:24] }
