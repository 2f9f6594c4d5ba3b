package tokenize

import (
	"encoding/json"
	"errors"
	"fmt"
	"testing"
	"time"

	"h3infer/infer"
)

// refTools is a request's tools as the gateway passes them on.
const refTools = `[{"type":"function","function":{"name":"get_weather","description":"Weather now in a city.","parameters":{"type":"object","properties":{"city":{"type":"string","description":"City name"},"unit":{"enum":["c","f"]},"days":{"type":"integer"}},"required":["city","unit","days"],"additionalProperties":false}}},{"type":"function","function":{"name":"now","description":"The time.","parameters":{"type":"object","properties":{}}}}]`

// refToolConversations use tools: calls in the history, with and
// without content, tool answers with their call's id.
func refToolConversations() map[string][]infer.ChatMessage {
	call := infer.ToolCall{ID: "call_1", Name: "get_weather", Arguments: `{"city": "Oslo", "unit": "c", "days": 1}`}
	return map[string][]infer.ChatMessage{
		"ask": {{Role: "system", Content: "Use tools."}, {Role: "user", Content: "Weather in Oslo?"}},
		"call and answer": {
			{Role: "user", Content: "Weather in Oslo?"},
			{Role: "assistant", ToolCalls: []infer.ToolCall{call}},
			{Role: "tool", Content: `{"temp": 4}`, ToolCallID: "call_1"},
		},
		"two calls then text": {
			{Role: "system", Content: "Be brief."},
			{Role: "user", Content: "Oslo and the time?"},
			{Role: "assistant", Content: "Checking.", ToolCalls: []infer.ToolCall{call, {ID: "call_2", Name: "now", Arguments: `{}`}}},
			{Role: "tool", Content: `{"temp": 4}`, ToolCallID: "call_1"},
			{Role: "tool", Content: `"09:05"`, ToolCallID: "call_2"},
			{Role: "assistant", Content: "4 degrees at 09:05."},
			{Role: "user", Content: "Thanks"},
		},
	}
}

// TestToolTemplatesMatchReference renders the real tool-capable chat
// templates with tools and tool calls, ours and @huggingface/jinja's,
// and wants the same bytes or both to refuse. A template that does not
// take tools is given the tool conversations without them.
func TestToolTemplatesMatchReference(t *testing.T) {
	templates := refTemplates(t)
	// As the text, not a decoded map, whose keys encoding/json would
	// sort: templates write a tool's keys in the order it gives them.
	tools := json.RawMessage(refTools)
	type key struct {
		tmpl, conv string
		tools      bool
	}
	var keys []key
	var cases []refCase
	withTools := 0
	for _, rt := range templates {
		if rt.tmpl.TakesTools() {
			withTools++
		}
		for name, msgs := range refToolConversations() {
			wire := make([]map[string]any, len(msgs))
			for i, m := range msgs {
				w := map[string]any{"role": m.Role, "content": m.Content}
				if m.Content == "" && len(m.ToolCalls) > 0 && rt.tmpl.NoneForSilentCalls() {
					w["content"] = nil
				}
				if len(m.ToolCalls) > 0 {
					var calls []map[string]any
					for _, c := range m.ToolCalls {
						calls = append(calls, map[string]any{"id": c.ID, "type": "function", "function": map[string]any{"name": c.Name, "arguments": c.Arguments}})
					}
					w["tool_calls"] = calls
				}
				if m.ToolCallID != "" {
					w["tool_call_id"] = m.ToolCallID
				}
				wire[i] = w
			}
			ctx := map[string]any{"messages": wire, "add_generation_prompt": true, "tools": nil, "documents": nil}
			if rt.tmpl.TakesTools() {
				ctx["tools"] = tools
			}
			if rt.bos != "" {
				ctx["bos_token"] = rt.bos
			}
			if rt.eos != "" {
				ctx["eos_token"] = rt.eos
			}
			keys = append(keys, key{rt.name, name, rt.tmpl.TakesTools()})
			cases = append(cases, refCase{Template: rt.src, Context: ctx, Now: refNow.Format(time.RFC3339)})
		}
	}
	if withTools == 0 {
		t.Fatal("no reference template takes tools")
	}
	want := renderReference(t, cases)
	byName := map[string]*ChatTemplate{}
	for _, rt := range templates {
		byName[rt.name] = rt.tmpl
	}
	convs := refToolConversations()
	rendered := 0
	for i, k := range keys {
		tools := ""
		if k.tools {
			tools = refTools
		}
		got, err := byName[k.tmpl].RenderTools(convs[k.conv], tools, true)
		w := want[i]
		label := fmt.Sprintf("%s / %s / tools=%v", k.tmpl, k.conv, k.tools)
		switch {
		case w.Error != nil:
			if _, ok := errors.AsType[*ConversationError](err); !ok {
				t.Errorf("%s: the reference refuses (%s), ours: %q, %v", label, *w.Error, got, err)
			}
		case err != nil:
			t.Errorf("%s: %v; the reference renders %q", label, err, *w.Output)
		case got != *w.Output:
			t.Errorf("%s: %s", label, describeDiff(got, *w.Output))
		default:
			rendered++
		}
	}
	if rendered == 0 {
		t.Error("no tool conversation rendered")
	}
}

// TestRenderToolsRefusesNamed checks that a template that cannot show
// the model its tools refuses them rather than drop them.
func TestRenderToolsRefusesNamed(t *testing.T) {
	tmpl, _ := LookupTemplate(TemplateChatML)
	_, err := tmpl.RenderTools([]infer.ChatMessage{{Role: "user", Content: "hi"}}, refTools, true)
	if _, ok := errors.AsType[*ConversationError](err); !ok {
		t.Errorf("got %v, want a *ConversationError", err)
	}
}
