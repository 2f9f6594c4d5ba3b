package engine

import (
	"encoding/json"
	"fmt"

	"h3infer/constrain"
	"h3infer/infer"
	"h3infer/toolcall"
)

// A request with tools shows them to the model through its chat
// template, and its completion's text goes through the model family's
// parser (toolcall.Parser), which answers the calls the model writes as
// Token.ToolCalls. With tool_choice required or a named function, the
// completion is constrained to one call (constrain.Calls): the family's
// syntax around arguments that the function's parameters accept.

// toolFunction is what the worker reads of one of a request's tools.
type toolFunction struct {
	Type     string `json:"type"`
	Function struct {
		Name       string          `json:"name"`
		Parameters json.RawMessage `json:"parameters"`
	} `json:"function"`
}

// toolSetup is what a request's tools make of its sequence: the tools
// its template is given ("" none), the parser of its completion and the
// grammar that forces a call (nil under auto).
type toolSetup struct {
	tools   string
	parser  *toolcall.Parser
	format  *constrain.Grammar
	serial  bool
	markers map[int]string
}

// specialModel is a Model whose tokenizer finds a special token by its
// text. Some tokenizers hold a family's call markers as special tokens
// (Mistral's [TOOL_CALLS]), which generated text skips: a request with
// tools spells them, for its parser, which keeps them out of content.
type specialModel interface {
	SpecialID(text string) (id int, ok bool)
}

// piece is the model's Piece of id, with the request's tool call
// markers spelled.
func (q *sequence) piece(id int) (string, bool) {
	p, end := q.m.Piece(id)
	if p == "" && !end && q.markers != nil {
		if m, ok := q.markers[id]; ok {
			return m, false
		}
	}
	return p, end
}

// setupTools reads s's tools against the model's tool call format.
func setupTools(m Model, s *infer.Request) (toolSetup, error) {
	invalid := func(format string, args ...any) error {
		return &RequestError{infer.CodeInvalidRequest, fmt.Sprintf(format, args...)}
	}
	if s.Tools == "" {
		if s.ToolChoice == infer.ToolRequired || s.ToolChoice == infer.ToolFunction {
			return toolSetup{}, invalid("tool_choice: %q needs tools", s.ToolChoice)
		}
		return toolSetup{}, nil
	}
	if s.ToolChoice == infer.ToolNone {
		// The model may not call them: it is not shown them either, so
		// that its answer is text.
		return toolSetup{}, nil
	}
	if len(s.Messages) == 0 {
		return toolSetup{}, invalid("tools: only chat requests take tools")
	}
	var fns []toolFunction
	if err := json.Unmarshal([]byte(s.Tools), &fns); err != nil || len(fns) == 0 {
		return toolSetup{}, invalid("tools: must be a non-empty array of functions")
	}
	tmpl := m.ChatTemplate()
	format := tmpl.ToolFormat
	if format == "" || !tmpl.TakesTools() {
		return toolSetup{}, invalid("tools: model %s's chat template (%s) shows no tool call format this server parses; set tool_format in its model.json (one of %v) if its template takes tools",
			m.Info().Name, tmpl, toolcall.Formats())
	}
	names := make([]string, len(fns))
	for i, f := range fns {
		names[i] = f.Function.Name
	}
	t := toolSetup{tools: s.Tools, parser: toolcall.NewParser(format, names), serial: s.SerialToolCalls}
	if sm, ok := m.(specialModel); ok {
		for _, mk := range toolcall.Markers(format) {
			if id, ok := sm.SpecialID(mk); ok {
				if t.markers == nil {
					t.markers = map[int]string{}
				}
				t.markers[id] = mk
			}
		}
	}
	var forced []toolFunction
	switch s.ToolChoice {
	case infer.ToolRequired:
		forced = fns
	case infer.ToolFunction:
		for _, f := range fns {
			if f.Function.Name == s.ToolName {
				forced = append(forced, f)
			}
		}
		if len(forced) == 0 {
			return toolSetup{}, invalid("tool_choice: function %q is not among the tools", s.ToolName)
		}
	}
	if forced != nil {
		calls := make([]constrain.Call, len(forced))
		for i, f := range forced {
			pre, suf, err := toolcall.Syntax(format, f.Function.Name)
			if err != nil {
				return toolSetup{}, err
			}
			calls[i] = constrain.Call{Prefix: pre, Parameters: f.Function.Parameters, Suffix: suf}
		}
		g, err := constrain.Calls(calls)
		if err != nil {
			return toolSetup{}, invalid("tools: %v", err)
		}
		t.format = g
	}
	return t, nil
}

// next is nextText with the completion's text read for tool calls: the
// calls it writes leave the text and ride as ToolCalls, streamed as the
// model writes their arguments, and a completion that made calls
// finishes with "tool_calls". Without parallel tool calls it ends once
// its first call's arguments are whole; it ends too where the model
// broke the JSON of arguments already streaming (toolcall.Parser).
func (q *sequence) next() (infer.Token, *infer.Done) {
	tok, done := q.nextText()
	p := q.tools
	if p == nil {
		return tok, done
	}
	tok.Text, tok.ToolCalls = p.Push(tok.Text)
	if done == nil && (q.serialCalls && p.Whole() > 0 || p.Broken()) {
		text, calls := p.Push(q.text.Flush())
		tok.Text += text
		tok.ToolCalls = append(tok.ToolCalls, calls...)
		done = q.done(infer.FinishStop)
	}
	if done != nil {
		text, calls := p.Flush()
		tok.Text += text
		tok.ToolCalls = append(tok.ToolCalls, calls...)
		if p.Calls() > 0 && done.FinishReason == infer.FinishStop {
			done.FinishReason = infer.FinishToolCalls
		}
	}
	return tok, done
}
