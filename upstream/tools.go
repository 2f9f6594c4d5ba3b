package upstream

import (
	"encoding/json"
	"errors"
	"fmt"

	"h3infer/infer"
)

// Tools upstream: the request's tools, tool choice and the messages'
// calls go as OpenAI writes them, and the calls the upstream's model makes
// come back as the stream's tool call deltas, checked before a client
// sees them.

// toolChoice is tool_choice as the upstream takes it; nil leaves it out.
func toolChoice(r *infer.Request) any {
	switch r.ToolChoice {
	case "":
		return nil
	case infer.ToolFunction:
		type fn struct {
			Name string `json:"name"`
		}
		return struct {
			Type     string `json:"type"`
			Function fn     `json:"function"`
		}{"function", fn{r.ToolName}}
	}
	return r.ToolChoice
}

type wireToolCall struct {
	ID       string       `json:"id"`
	Type     string       `json:"type"`
	Function wireFunction `json:"function"`
}

type wireFunction struct {
	Name      string `json:"name"`
	Arguments string `json:"arguments"`
}

// upstreamMessage is one message of the conversation as it goes
// upstream: an assistant's calls with content null when it said nothing
// else, as OpenAI writes them.
func upstreamMessage(m infer.ChatMessage) chatMessage {
	out := chatMessage{Role: m.Role, Content: &m.Content, ToolCallID: m.ToolCallID}
	if len(m.ToolCalls) > 0 {
		if m.Content == "" {
			out.Content = nil
		}
		out.ToolCalls = make([]wireToolCall, len(m.ToolCalls))
		for i, c := range m.ToolCalls {
			out.ToolCalls[i] = wireToolCall{ID: c.ID, Type: "function", Function: wireFunction{Name: c.Name, Arguments: c.Arguments}}
		}
	}
	return out
}

// maxCalls bounds the calls of one answer from an upstream, as the
// gateway bounds those of a message a client sends.
const maxCalls = 128

// callReader checks an upstream's tool call deltas against the request:
// each call opened once, in order, with an id and a function the request
// offered (the one it named, when it named one), its arguments only
// after it opened.
type callReader struct {
	offered map[string]bool
	named   string // tool_choice's function; "" when it named none
	serial  bool   // parallel_tool_calls false: one call at most
	opened  int
}

// newCallReader is the reader for r's answer; nil when r offers no tools
// (any call then is a malformed stream).
func newCallReader(r *infer.Request) (*callReader, error) {
	if r.Tools == "" || r.ToolChoice == infer.ToolNone {
		return nil, nil
	}
	var tools []struct {
		Function struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	if err := json.Unmarshal([]byte(r.Tools), &tools); err != nil {
		return nil, err // the gateway checked them: never
	}
	cr := &callReader{offered: make(map[string]bool, len(tools)), serial: r.SerialToolCalls}
	for _, t := range tools {
		cr.offered[t.Function.Name] = true
	}
	if r.ToolChoice == infer.ToolFunction {
		cr.named = r.ToolName
	}
	return cr, nil
}

type wireCallDelta struct {
	Index    *uint32 `json:"index"`
	ID       string  `json:"id"`
	Type     string  `json:"type"`
	Function struct {
		Name      string `json:"name"`
		Arguments string `json:"arguments"`
	} `json:"function"`
}

var errNoTools = errors.New("a tool call the request offered no tools for")

// read checks one chunk's tool_calls (raw, as the upstream wrote them).
func (cr *callReader) read(raw json.RawMessage) ([]infer.ToolCallDelta, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	if cr == nil {
		return nil, errNoTools
	}
	var ds []wireCallDelta
	if err := json.Unmarshal(raw, &ds); err != nil {
		return nil, fmt.Errorf("tool_calls: %w", err)
	}
	out := make([]infer.ToolCallDelta, 0, len(ds))
	for i, d := range ds {
		if d.Index == nil {
			return nil, fmt.Errorf("tool_calls[%d]: no index", i)
		}
		idx := int(*d.Index)
		switch {
		case d.ID != "" && idx == cr.opened:
			// A call opens: its id and function.
			if d.Function.Name == "" || !cr.offered[d.Function.Name] || cr.named != "" && d.Function.Name != cr.named {
				return nil, fmt.Errorf("tool_calls[%d]: a call of %q, which the request did not offer", i, d.Function.Name)
			}
			if d.Type != "" && d.Type != "function" {
				return nil, fmt.Errorf("tool_calls[%d]: type %q", i, d.Type)
			}
			if cr.opened++; cr.opened > maxCalls || cr.serial && cr.opened > 1 {
				return nil, fmt.Errorf("tool_calls[%d]: %d calls, more than the request allows", i, cr.opened)
			}
		case d.ID == "" && d.Function.Name == "" && idx == cr.opened-1:
			// More of the open call's arguments.
		default:
			return nil, fmt.Errorf("tool_calls[%d]: call %d out of order (%d opened)", i, idx, cr.opened)
		}
		out = append(out, infer.ToolCallDelta{Index: uint32(idx), ID: d.ID, Name: d.Function.Name, Arguments: d.Function.Arguments})
	}
	return out, nil
}
