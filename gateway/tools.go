package gateway

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	"h3infer/constrain"
	"h3infer/infer"
)

// OpenAI's function calling: tools, tool_choice and parallel_tool_calls
// on a chat request, and tool_calls and tool_call_id on its messages.
// The gateway checks and bounds them; the worker shows the tools to the
// model's chat template, parses the calls it writes and forces one where
// tool_choice asks for it (engine/tools.go).

// Bounds on a request's tools; docs/SECURITY.md lists them. Each
// function's parameters is bounded as a response_format is
// (constrain.MaxFormatBytes and the grammar's own bounds).
const (
	// maxTools is OpenAI's own limit on a request's functions.
	maxTools = 128
	// maxToolsBytes bounds the tools' JSON text: the template renders
	// it into every such request's prompt.
	maxToolsBytes = 512 << 10
	// maxMessageToolCalls bounds the calls of one assistant message.
	maxMessageToolCalls = 128
)

// toolParam is one of a request's tools.
type toolParam struct {
	Type     string         `json:"type"`
	Function *functionParam `json:"function"`
}

type functionParam struct {
	Name        string          `json:"name"`
	Description *string         `json:"description,omitempty"`
	Parameters  json.RawMessage `json:"parameters,omitempty"`
	// Strict is accepted and always holds where a call is forced: the
	// arguments of a forced call follow the schema exactly.
	Strict *bool `json:"strict,omitempty"`
}

// toolCallParam is one call of an assistant message in the history.
type toolCallParam struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function struct {
		Name      string `json:"name"`
		Arguments string `json:"arguments"`
	} `json:"function"`
}

// toolParams checks req's tools, tool_choice and parallel_tool_calls
// and sets them on job: the tools as the worker's template gets them
// (type and function with name, description and parameters, in OpenAI's
// order; strict left out).
func toolParams(req *completionRequest, kind apiKind, job *infer.Request) error {
	tools := bytes.TrimSpace(req.Tools)
	if bytes.Equal(tools, []byte("null")) {
		tools = nil
	}
	choice := bytes.TrimSpace(req.ToolChoice)
	if bytes.Equal(choice, []byte("null")) {
		choice = nil
	}
	if len(tools) > maxToolsBytes {
		return invalidf("tools", "tools: at most %d bytes, got %d", maxToolsBytes, len(tools))
	}
	var list []json.RawMessage
	if tools != nil {
		if err := json.Unmarshal(tools, &list); err != nil {
			return invalidf("tools", "tools: must be an array of tools")
		}
	}
	if len(list) > maxTools {
		return invalidf("tools", "tools: at most %d tools, got %d", maxTools, len(list))
	}
	fns := make([]toolParam, len(list))
	names := map[string]bool{}
	for i, raw := range list {
		path := fmt.Sprintf("tools[%d]", i)
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.DisallowUnknownFields()
		f := &fns[i]
		if err := dec.Decode(f); err != nil {
			return invalidf("tools", "%s: must be {\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\", \"strict\"}}: %v", path, err)
		}
		if f.Type != "function" {
			return invalidf("tools", "%s.type: must be \"function\", got %q", path, f.Type)
		}
		if f.Function == nil {
			return invalidf("tools", "%s.function: required", path)
		}
		if !constrain.ValidName(f.Function.Name) {
			return invalidf("tools", "%s.function.name: must be 1 to 64 letters, digits, underscores or dashes, got %q", path, f.Function.Name)
		}
		if names[f.Function.Name] {
			return invalidf("tools", "%s.function.name: %q is given twice", path, f.Function.Name)
		}
		names[f.Function.Name] = true
		if err := constrain.CheckParameters(f.Function.Parameters, path+".function.parameters"); err != nil {
			return invalidf("tools", "%v", err)
		}
		f.Function.Strict = nil
	}
	if len(fns) > 0 {
		b, err := json.Marshal(fns)
		if err != nil {
			return invalidf("tools", "tools: %v", err)
		}
		job.Tools = string(b)
	}
	if err := toolChoice(choice, names, job); err != nil {
		return err
	}
	if p := req.ParallelToolCalls; p != nil && !*p {
		job.SerialToolCalls = true
	}
	if kind != kindChat {
		// Text completions have no tools; the values that ask for
		// nothing are accepted, as they were before chat had tools.
		if job.Tools != "" {
			return invalidf("tools", "tools: only chat completions take tools")
		}
		if job.ToolChoice == infer.ToolRequired || job.ToolChoice == infer.ToolFunction {
			return invalidf("tool_choice", "tool_choice: only chat completions take tools")
		}
		job.ToolChoice, job.SerialToolCalls = "", false
		return nil
	}
	if job.ToolChoice == infer.ToolRequired || job.ToolChoice == infer.ToolFunction {
		if job.ResponseFormat != "" {
			return invalidf("tool_choice", "tool_choice: a required call cannot be combined with response_format")
		}
		// The worker joins the forced functions' schemas into one
		// grammar, whose bounds hold over all of them: check them here.
		var calls []constrain.Call
		for _, f := range fns {
			if job.ToolChoice == infer.ToolRequired || f.Function.Name == job.ToolName {
				calls = append(calls, constrain.Call{Prefix: "(", Parameters: f.Function.Parameters, Suffix: ")"})
			}
		}
		if _, err := constrain.Calls(calls); err != nil {
			return invalidf("tools", "%v", err)
		}
	}
	return nil
}

// toolChoice reads tool_choice: "none", "auto", "required" or
// {"type": "function", "function": {"name": NAME}} naming one of the
// tools; absent is "auto" (OpenAI's default with tools).
func toolChoice(raw json.RawMessage, names map[string]bool, job *infer.Request) error {
	if raw == nil {
		return nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		switch s {
		case infer.ToolNone, infer.ToolAuto:
		case infer.ToolRequired:
			if len(names) == 0 {
				return invalidf("tool_choice", "tool_choice: \"required\" needs tools")
			}
		default:
			return invalidf("tool_choice", "tool_choice: must be none, auto, required or a function, got %q", s)
		}
		job.ToolChoice = s
		return nil
	}
	var named struct {
		Type     string `json:"type"`
		Function struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&named); err != nil || named.Type != "function" {
		return invalidf("tool_choice", "tool_choice: must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")
	}
	if !names[named.Function.Name] {
		return invalidf("tool_choice", "tool_choice.function.name: %q is not among the tools", named.Function.Name)
	}
	job.ToolChoice, job.ToolName = infer.ToolFunction, named.Function.Name
	return nil
}

// messageTools checks message i's tool calls and tool call id, and sets
// them on out.
func messageTools(out *infer.ChatMessage, m chatMessage, i int) error {
	if id := m.ToolCallID; id != nil {
		if m.Role != "tool" {
			return invalidf(fmt.Sprintf("messages[%d].tool_call_id", i), "messages[%d].tool_call_id: only tool messages answer a call", i)
		}
		out.ToolCallID = *id
	}
	if len(m.ToolCalls) == 0 {
		return nil
	}
	param := fmt.Sprintf("messages[%d].tool_calls", i)
	if m.Role != "assistant" {
		return invalidf(param, "%s: only assistant messages make calls", param)
	}
	if len(m.ToolCalls) > maxMessageToolCalls {
		return invalidf(param, "%s: at most %d calls, got %d", param, maxMessageToolCalls, len(m.ToolCalls))
	}
	out.ToolCalls = make([]infer.ToolCall, len(m.ToolCalls))
	for j, c := range m.ToolCalls {
		if c.Type != "function" {
			return invalidf(param, "%s[%d].type: must be \"function\", got %q", param, j, c.Type)
		}
		if c.Function.Name == "" {
			return invalidf(param, "%s[%d].function.name: required", param, j)
		}
		out.ToolCalls[j] = infer.ToolCall{ID: c.ID, Name: c.Function.Name, Arguments: c.Function.Arguments}
	}
	return nil
}

// The response shapes of tool calls: whole in a message, and as deltas
// in a stream's chunks.

type toolCallOut struct {
	ID       string          `json:"id"`
	Type     string          `json:"type"`
	Function functionCallOut `json:"function"`
}

type functionCallOut struct {
	Name      string `json:"name"`
	Arguments string `json:"arguments"`
}

// toolCallChunk is one delta of a call: the first carries its id, type
// and name with arguments "", the next ones arguments to append.
type toolCallChunk struct {
	Index    uint32            `json:"index"`
	ID       string            `json:"id,omitempty"`
	Type     string            `json:"type,omitempty"`
	Function functionCallChunk `json:"function"`
}

type functionCallChunk struct {
	Name      string `json:"name,omitempty"`
	Arguments string `json:"arguments"`
}

// toolCallsMessage is the assistant's message of a completion that made
// calls: content null when it said nothing else.
type toolCallsMessage struct {
	Role      string        `json:"role"`
	Content   *string       `json:"content"`
	ToolCalls []toolCallOut `json:"tool_calls"`
}

// toolCalls gathers a completion's call deltas into whole calls: each
// call's arguments in a builder of its own, since a call may come in
// many small deltas (one per token), which appending to a string would
// copy over and over.
type toolCalls struct {
	calls []toolCallOut
	args  []strings.Builder
}

// A delta with an id opens a call; one without adds arguments to the
// call of its index (an upstream may send a call's arguments in many
// deltas).
func (c *toolCalls) add(deltas []infer.ToolCallDelta) {
	for _, d := range deltas {
		i := int(d.Index)
		if d.ID != "" || i >= len(c.calls) {
			c.calls = append(c.calls, toolCallOut{ID: d.ID, Type: "function", Function: functionCallOut{Name: d.Name}})
			c.args = append(c.args, strings.Builder{})
			i = len(c.calls) - 1
		}
		c.args[i].WriteString(d.Arguments)
	}
}

// whole is the calls with their arguments.
func (c *toolCalls) whole() []toolCallOut {
	for i := range c.calls {
		c.calls[i].Function.Arguments = c.args[i].String()
	}
	return c.calls
}

// toolCallEvents renders one chunk per delta.
func (e *encoder) toolCallEvents(deltas []infer.ToolCallDelta) [][]byte {
	out := make([][]byte, len(deltas))
	for i, d := range deltas {
		c := toolCallChunk{Index: d.Index, ID: d.ID, Function: functionCallChunk{Name: d.Name, Arguments: d.Arguments}}
		if d.ID != "" {
			c.Type = "function"
		}
		out[i] = e.chunk([]chatChunkChoice{{Delta: chatDelta{ToolCalls: []toolCallChunk{c}}}}, nil)
	}
	return out
}

// completeWithCalls renders the whole answer of a completion that made
// calls.
func (e *encoder) completeWithCalls(text, reason string, u usage, lps []infer.TokenLogprob, calls []toolCallOut) []byte {
	r := fullResponse{envelope: e.env, Usage: u}
	r.Object = "chat.completion"
	chat, _, _ := e.logprobs(lps, 0)
	msg := toolCallsMessage{Role: "assistant", ToolCalls: calls}
	if text != "" {
		msg.Content = &text
	}
	r.Choices = []struct {
		Index        int              `json:"index"`
		Message      toolCallsMessage `json:"message"`
		Logprobs     *chatLogprobs    `json:"logprobs"`
		FinishReason string           `json:"finish_reason"`
	}{{Message: msg, Logprobs: chat, FinishReason: reason}}
	b, _ := json.Marshal(r)
	return append(b, '\n')
}
