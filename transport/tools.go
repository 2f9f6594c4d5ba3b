package transport

import (
	"encoding/binary"

	"h3infer/infer"
)

// The tool parts of the submit and token frames, each present only when
// the request or token has any, so that the frames of a request without
// tools are the bytes they were before tools existed.

func toolFlags(s *infer.Request) byte {
	var f byte
	if s.Tools != "" || s.ToolChoice != "" || s.ToolName != "" || s.SerialToolCalls {
		f |= submitTools
	}
	for _, m := range s.Messages {
		if len(m.ToolCalls) > 0 || m.ToolCallID != "" {
			f |= submitToolHistory
			break
		}
	}
	return f
}

// appendTools appends, after the rest of a submit frame, the tools,
// tool choice, tool name and a byte for parallel_tool_calls false
// (submitTools), then per message its tool call id and calls
// (submitToolHistory).
func appendTools(b []byte, s *infer.Request, flags byte) []byte {
	if flags&submitTools != 0 {
		b = appendString(b, s.Tools)
		b = appendString(b, s.ToolChoice)
		b = appendString(b, s.ToolName)
		var serial byte
		if s.SerialToolCalls {
			serial = 1
		}
		b = append(b, serial)
	}
	if flags&submitToolHistory != 0 {
		for _, m := range s.Messages {
			b = appendString(b, m.ToolCallID)
			b = binary.AppendUvarint(b, uint64(len(m.ToolCalls)))
			for _, c := range m.ToolCalls {
				b = appendString(b, c.ID)
				b = appendString(b, c.Name)
				b = appendString(b, c.Arguments)
			}
		}
	}
	return b
}

func decodeTools(d *decoder, s *infer.Request, flags byte) {
	if flags&submitTools != 0 {
		s.Tools = d.string("tools")
		s.ToolChoice = d.string("tool_choice")
		s.ToolName = d.string("tool name")
		switch serial := d.byte("parallel_tool_calls"); serial {
		case 0:
		case 1:
			s.SerialToolCalls = true
		default:
			d.fail("parallel_tool_calls byte %d", serial)
		}
	}
	if flags&submitToolHistory != 0 {
		for i := range s.Messages {
			m := &s.Messages[i]
			m.ToolCallID = d.string("tool_call_id")
			// A call is at least three lengths.
			if n := d.count("tool_calls", 3); n > 0 && d.err == nil {
				m.ToolCalls = make([]infer.ToolCall, n)
				for j := range m.ToolCalls {
					m.ToolCalls[j] = infer.ToolCall{ID: d.string("tool call id"), Name: d.string("tool call name"), Arguments: d.string("tool call arguments")}
				}
			}
		}
	}
}

// appendToolCalls appends a token's tool call deltas after its logprobs:
// nothing when it has none, else their count and each one's index, id,
// name and arguments.
func appendToolCalls(b []byte, calls []infer.ToolCallDelta) []byte {
	if len(calls) == 0 {
		return b
	}
	b = binary.AppendUvarint(b, uint64(len(calls)))
	for _, c := range calls {
		b = binary.AppendUvarint(b, uint64(c.Index))
		b = appendString(b, c.ID)
		b = appendString(b, c.Name)
		b = appendString(b, c.Arguments)
	}
	return b
}

func decodeToolCalls(d *decoder) []infer.ToolCallDelta {
	if d.err != nil || len(d.p) == 0 {
		return nil
	}
	n := d.count("tool_calls", 4)
	if n == 0 {
		d.fail("an empty list of tool calls")
	}
	if d.err != nil {
		return nil
	}
	calls := make([]infer.ToolCallDelta, n)
	for i := range calls {
		calls[i] = infer.ToolCallDelta{Index: d.uint32("tool call index"), ID: d.string("tool call id"), Name: d.string("tool call name"), Arguments: d.string("tool call arguments")}
	}
	return calls
}
