package engine

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"h3infer/infer"
	"h3infer/tokenize"
	"h3infer/toolcall"
)

// scripted is a model over a byte vocabulary (ids 0..255, and 256 the
// end) whose logits favour the next byte of its script, then the end:
// greedy decoding writes the script, unless a mask forbids it.
type scripted struct {
	script string
	pos    int
	chat   *tokenize.ChatTemplate
}

const scriptedEnd = 256

func (s *scripted) Info() infer.ModelInfo {
	return infer.ModelInfo{Name: "scripted", ContextLength: 1 << 14}
}
func (s *scripted) ChatTemplate() *tokenize.ChatTemplate { return s.chat }
func (s *scripted) Encode(text string) []int {
	ids := make([]int, len(text))
	for i := range len(text) {
		ids[i] = int(text[i])
	}
	return ids
}
func (s *scripted) EncodeSpecial(text string) []int { return s.Encode(text) }
func (s *scripted) Piece(id int) (string, bool) {
	if id == scriptedEnd {
		return "", true
	}
	return string([]byte{byte(id)}), false
}
func (s *scripted) logits() []float32 {
	l := make([]float32, scriptedEnd+1)
	if s.pos < len(s.script) {
		l[s.script[s.pos]] = 10
	} else {
		l[scriptedEnd] = 10
	}
	s.pos++
	return l
}
func (s *scripted) Prefill([]int) ([]float32, [][]byte, error) { return s.logits(), nil, nil }
func (s *scripted) Join([][]byte, int)                         {}
func (s *scripted) Leave(int)                                  {}
func (s *scripted) Step([]int) ([]float32, error)              { return s.logits(), nil }
func (s *scripted) KVBytes(int, int) int64                     { return 0 }
func (s *scripted) Close() error                               { return nil }

// toolTemplate is a Jinja template that shows its tools and the Hermes
// call syntax, as Qwen's does.
const toolTemplate = `{% for m in messages %}{{ m.role }}: {{ m.content }}
{% endfor %}{% if tools %}{% for t in tools %}{{ t | tojson }}
{% endfor %}Call as <tool_call>{"name": ..., "arguments": ...}</tool_call>
{% endif %}assistant:`

func toolChat(t *testing.T) *tokenize.ChatTemplate {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, tokenize.ChatTemplateFile), []byte(toolTemplate), 0o600); err != nil {
		t.Fatal(err)
	}
	tmpl, err := tokenize.LoadJinja(dir)
	if err != nil {
		t.Fatal(err)
	}
	tmpl.ToolFormat = toolcall.Detect(tmpl.Source())
	return tmpl
}

// TestToolCallsInWorker runs requests with tools through the worker's
// generation path on a model that writes a fixed script: the calls it
// writes leave the text and come out as deltas, per tool_choice and
// parallel_tool_calls; a forced call overrides what the model prefers.
func TestToolCallsInWorker(t *testing.T) {
	chat := toolChat(t)
	if chat.ToolFormat != toolcall.Hermes {
		t.Fatalf("detected %q, want hermes", chat.ToolFormat)
	}
	const tools = `[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":false}}},{"type":"function","function":{"name":"g"}}]`
	call := func(name, args string) string {
		return "<tool_call>\n{\"name\": \"" + name + "\", \"arguments\": " + args + "}\n</tool_call>"
	}
	twoCalls := "Sure. " + call("f", `{"a": 1}`) + "\n" + call("g", `{}`)
	for name, tc := range map[string]struct {
		script       string
		req          infer.Request
		content      string
		calls        []string // name(args)
		finish       string
		promptHasFns bool
	}{
		"auto":     {script: twoCalls, content: "Sure. \n", calls: []string{`f({"a": 1})`, `g({})`}, finish: infer.FinishToolCalls, promptHasFns: true},
		"serial":   {script: twoCalls, req: infer.Request{SerialToolCalls: true}, content: "Sure. ", calls: []string{`f({"a": 1})`}, finish: infer.FinishToolCalls, promptHasFns: true},
		"none":     {script: twoCalls, req: infer.Request{ToolChoice: infer.ToolNone}, content: twoCalls, finish: infer.FinishStop},
		"no call":  {script: "Just text.", content: "Just text.", finish: infer.FinishStop, promptHasFns: true},
		"bad name": {script: call("h", `{}`), content: call("h", `{}`), finish: infer.FinishStop, promptHasFns: true},
		// The model would write prose; the mask makes it call f, whose
		// arguments must have an integer a.
		"named":    {script: "I would rather talk.", req: infer.Request{ToolChoice: infer.ToolFunction, ToolName: "f"}, calls: []string{`f({"a":-0})`}, finish: infer.FinishToolCalls, promptHasFns: true},
		"required": {script: call("g", `{}`), req: infer.Request{ToolChoice: infer.ToolRequired}, calls: []string{`g({})`}, finish: infer.FinishToolCalls, promptHasFns: true},
	} {
		m := &scripted{script: tc.script, chat: chat}
		req := tc.req
		req.Model, req.Tools, req.MaxTokens = "scripted", tools, 200
		req.Messages = []infer.ChatMessage{{Role: "user", Content: "hi"}}
		q, err := newSequence(m, &req)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := strings.Contains(string(bytesOf(q.prompt)), `"name": "f"`); got != tc.promptHasFns {
			t.Errorf("%s: the prompt shows the tools: %v, want %v", name, got, tc.promptHasFns)
		}
		m.pos = 0
		var content strings.Builder
		var deltas []infer.ToolCallDelta
		done, err := generate(context.Background(), m, &req, func(tok infer.Token) {
			content.WriteString(tok.Text)
			deltas = append(deltas, tok.ToolCalls...)
		})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var calls []string
		for _, d := range deltas {
			if d.ID != "" {
				calls = append(calls, d.Name+"(")
			} else {
				calls[len(calls)-1] += d.Arguments
			}
		}
		for i := range calls {
			calls[i] += ")"
		}
		if content.String() != tc.content || strings.Join(calls, " ") != strings.Join(tc.calls, " ") || done.FinishReason != tc.finish {
			t.Errorf("%s: content %q, calls %q, finish %q; want %q, %q, %q", name, content.String(), calls, done.FinishReason, tc.content, tc.calls, tc.finish)
		}
		for _, c := range calls {
			args := c[strings.IndexByte(c, '(')+1 : len(c)-1]
			if !json.Valid([]byte(args)) {
				t.Errorf("%s: arguments %q are no JSON", name, args)
			}
		}
	}
}

// TestToolsRefused checks the worker's own refusals, each naming the
// parameter at fault.
func TestToolsRefused(t *testing.T) {
	plain, _ := tokenize.LookupTemplate(tokenize.TemplatePlain)
	const tools = `[{"type":"function","function":{"name":"f"}}]`
	msgs := []infer.ChatMessage{{Role: "user", Content: "hi"}}
	for name, tc := range map[string]struct {
		chat *tokenize.ChatTemplate
		req  infer.Request
		want string
	}{
		"plain template":   {plain, infer.Request{Messages: msgs, Tools: tools}, "tools: "},
		"unknown named":    {toolChat(t), infer.Request{Messages: msgs, Tools: tools, ToolChoice: infer.ToolFunction, ToolName: "x"}, "tool_choice: "},
		"required, none":   {toolChat(t), infer.Request{Messages: msgs, ToolChoice: infer.ToolRequired}, "tool_choice: "},
		"with format":      {toolChat(t), infer.Request{Messages: msgs, Tools: tools, ToolChoice: infer.ToolRequired, ResponseFormat: `{"type":"json_object"}`}, "tool_choice: "},
		"prompt, not chat": {toolChat(t), infer.Request{Prompt: "p", Tools: tools}, "tools: "},
	} {
		_, err := newSequence(&scripted{chat: tc.chat}, &tc.req)
		re, ok := err.(*RequestError)
		if !ok || re.Code != infer.CodeInvalidRequest || !strings.HasPrefix(re.Message, tc.want) {
			t.Errorf("%s: got %v, want an invalid request starting %q", name, err, tc.want)
		}
	}
}

func bytesOf(ids []int) []byte {
	b := make([]byte, len(ids))
	for i, id := range ids {
		b[i] = byte(id)
	}
	return b
}

// markerScripted is scripted with byte 1 a special token, Mistral's
// [TOOL_CALLS]: generated text skips it unless a request with tools
// spells it for its parser.
type markerScripted struct {
	scripted
	fed []int
}

func (s *markerScripted) Piece(id int) (string, bool) {
	if id == 1 {
		return "", false
	}
	return s.scripted.Piece(id)
}
func (s *markerScripted) SpecialID(text string) (int, bool) { return 1, text == "[TOOL_CALLS]" }
func (s *markerScripted) Step(next []int) ([]float32, error) {
	s.fed = append(s.fed, next...)
	return s.scripted.Step(next)
}

// TestToolMarkerSpecial runs Mistral's syntax on a model whose marker
// is a special token: the parser reads it and the client never sees it;
// a forced call writes the special token itself; arguments stream a
// piece at a time; a call whose JSON breaks ends the completion there.
func TestToolMarkerSpecial(t *testing.T) {
	dir := t.TempDir()
	const tmpl = `{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]`
	if err := os.WriteFile(filepath.Join(dir, tokenize.ChatTemplateFile), []byte(tmpl), 0o600); err != nil {
		t.Fatal(err)
	}
	chat, err := tokenize.LoadJinja(dir)
	if err != nil {
		t.Fatal(err)
	}
	if chat.ToolFormat = toolcall.Detect(chat.Source()); chat.ToolFormat != toolcall.Mistral {
		t.Fatalf("detected %q, want mistral", chat.ToolFormat)
	}
	const tools = `[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":false}}}]`
	const call = "\x01[{\"name\": \"f\", \"arguments\": {\"a\": 12}}]"
	for name, tc := range map[string]struct {
		script, content, args, finish string
		req                           infer.Request
		tokens                        int // completion tokens, 0 for the script's
	}{
		"auto":     {script: call, args: `{"a": 12}`, finish: infer.FinishToolCalls},
		"no tools": {script: call, req: infer.Request{ToolChoice: infer.ToolNone}, content: call[1:], finish: infer.FinishStop},
		"text":     {script: "plain [TOOL_CALLS] text", content: "plain  text", finish: infer.FinishStop},
		"broken":   {script: "\x01[{\"name\": \"f\", \"arguments\": {\"a\": 1 oops}}] and more", args: `{"a": 1 `, finish: infer.FinishToolCalls, tokens: len("\x01[{\"name\": \"f\", \"arguments\": {\"a\": 1 o")},
		"forced":   {script: "I would rather talk.", req: infer.Request{ToolChoice: infer.ToolFunction, ToolName: "f"}, args: `{"a":-0}`, finish: infer.FinishToolCalls},
	} {
		m := &markerScripted{scripted: scripted{script: tc.script, chat: chat}}
		req := tc.req
		req.Model, req.Tools, req.MaxTokens = "scripted", tools, 200
		req.Messages = []infer.ChatMessage{{Role: "user", Content: "hi"}}
		var content strings.Builder
		var deltas []infer.ToolCallDelta
		done, err := generate(context.Background(), m, &req, func(tok infer.Token) {
			content.WriteString(tok.Text)
			deltas = append(deltas, tok.ToolCalls...)
		})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var args strings.Builder
		for i, d := range deltas {
			if (i == 0) != (d.ID != "") || i == 0 && d.Name != "f" || d.Index != 0 {
				t.Errorf("%s: delta %d %+v", name, i, d)
			}
			args.WriteString(d.Arguments)
		}
		if content.String() != tc.content || args.String() != tc.args || done.FinishReason != tc.finish {
			t.Errorf("%s: content %q, arguments %q, finish %q; want %q, %q, %q", name, content.String(), args.String(), done.FinishReason, tc.content, tc.args, tc.finish)
		}
		if tc.args != "" && len(deltas) < 3 {
			t.Errorf("%s: %d deltas; want the arguments in several", name, len(deltas))
		}
		if tc.tokens > 0 && int(done.CompletionTokens) != tc.tokens {
			t.Errorf("%s: %d completion tokens, want %d: the completion ends where the call broke", name, done.CompletionTokens, tc.tokens)
		}
		if name == "forced" && (len(m.fed) == 0 || m.fed[0] != 1) {
			t.Errorf("forced: fed %v; want the special token [TOOL_CALLS] first", m.fed[:min(len(m.fed), 4)])
		}
	}
}
