package gateway

import (
	"fmt"
	"strings"
	"testing"

	"h3infer/infer"
)

const weatherTool = `{"type": "function", "function": {"name": "get_weather", "description": "Weather now.", "strict": true,
	"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false}}}`

// TestToolParams checks what the gateway makes of tools, tool_choice,
// parallel_tool_calls and the messages' calls, and that every bad value
// is a 400 naming its parameter, the place inside it in the message.
func TestToolParams(t *testing.T) {
	chat := func(extra string) string {
		return `{"model": "m", "messages": [{"role": "user", "content": "hi"}], ` + extra + `}`
	}
	manyTools := make([]string, maxTools+1)
	for i := range manyTools {
		manyTools[i] = fmt.Sprintf(`{"type": "function", "function": {"name": "f%d"}}`, i)
	}
	for name, tc := range map[string]struct {
		body         string
		param, inMsg string
		check        func(infer.Request) bool
	}{
		"tools": {body: chat(`"tools": [` + weatherTool + `]`), check: func(j infer.Request) bool {
			return j.Tools == `[{"type":"function","function":{"name":"get_weather","description":"Weather now.","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"],"additionalProperties":false}}}]` &&
				j.ToolChoice == "" && !j.SerialToolCalls
		}},
		"named": {body: chat(`"tools": [` + weatherTool + `], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": false`),
			check: func(j infer.Request) bool {
				return j.ToolChoice == infer.ToolFunction && j.ToolName == "get_weather" && j.SerialToolCalls
			}},
		"required": {body: chat(`"tools": [` + weatherTool + `], "tool_choice": "required"`), check: func(j infer.Request) bool { return j.ToolChoice == infer.ToolRequired }},
		"none":     {body: chat(`"tools": [` + weatherTool + `], "tool_choice": "none"`), check: func(j infer.Request) bool { return j.ToolChoice == infer.ToolNone }},
		"none, n":  {body: chat(`"tools": [` + weatherTool + `], "tool_choice": "none", "n": 2`), check: func(j infer.Request) bool { return j.N == 2 }},
		"history": {body: `{"model": "m", "messages": [{"role": "user", "content": "hi"},
			{"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
			{"role": "tool", "tool_call_id": "call_1", "content": "4"}]}`, check: func(j infer.Request) bool {
			m := j.Messages
			return len(m) == 3 && len(m[1].ToolCalls) == 1 && m[1].ToolCalls[0] == (infer.ToolCall{ID: "call_1", Name: "get_weather", Arguments: `{"city":"Oslo"}`}) &&
				m[1].Content == "" && m[2].ToolCallID == "call_1"
		}},

		"not a list":        {body: chat(`"tools": {"type": "function"}`), param: "tools"},
		"no function":       {body: chat(`"tools": [{"type": "function"}]`), param: "tools", inMsg: "tools[0].function"},
		"other type":        {body: chat(`"tools": [{"type": "web_search"}]`), param: "tools", inMsg: "tools[0].type"},
		"unknown key":       {body: chat(`"tools": [{"type": "function", "function": {"name": "f", "returns": {}}}]`), param: "tools", inMsg: "returns"},
		"bad name":          {body: chat(`"tools": [{"type": "function", "function": {"name": "a b"}}]`), param: "tools", inMsg: "tools[0].function.name"},
		"twice":             {body: chat(`"tools": [` + weatherTool + `, ` + weatherTool + `]`), param: "tools", inMsg: "tools[1].function.name"},
		"schema keyword":    {body: chat(`"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string", "format": "email"}}, "required": ["a"]}}}]`), param: "tools", inMsg: "tools[0].function.parameters.properties.a"},
		"schema not object": {body: chat(`"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "items": {"type": "string"}}}}]`), param: "tools", inMsg: "tools[0].function.parameters"},
		"too many":          {body: chat(`"tools": [` + strings.Join(manyTools, ",") + `]`), param: "tools", inMsg: "at most 128"},
		"too large":         {body: chat(`"tools": [{"type": "function", "function": {"name": "f", "description": "` + strings.Repeat("x", maxToolsBytes) + `"}}]`), param: "tools", inMsg: "bytes"},
		"choice unknown":    {body: chat(`"tools": [` + weatherTool + `], "tool_choice": "sometimes"`), param: "tool_choice"},
		"choice absent fn":  {body: chat(`"tools": [` + weatherTool + `], "tool_choice": {"type": "function", "function": {"name": "nope"}}`), param: "tool_choice"},
		"required no tools": {body: chat(`"tool_choice": "required"`), param: "tool_choice"},
		"with format":       {body: chat(`"tools": [` + weatherTool + `], "tool_choice": "required", "response_format": {"type": "json_object"}`), param: "tool_choice"},
		"parallel not bool": {body: chat(`"parallel_tool_calls": "yes"`), param: "parallel_tool_calls"},
		"call on user":      {body: `{"model": "m", "messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}`, param: "messages[0].tool_calls"},
		"id on user":        {body: `{"model": "m", "messages": [{"role": "user", "content": "hi", "tool_call_id": "c"}]}`, param: "messages[0].tool_call_id"},
		"call without name": {body: `{"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"arguments": "{}"}}]}]}`, param: "messages[0].tool_calls"},
		"with choices":      {body: chat(`"tools": [` + weatherTool + `], "n": 2`), param: "n", inMsg: "tools"},
		"text tools":        {body: `{"model": "m", "prompt": "p", "tools": [` + weatherTool + `]}`, param: "tools"},
	} {
		kind := kindChat
		if strings.Contains(tc.body, `"prompt"`) {
			kind = kindText
		}
		c, err := parseCompletion([]byte(tc.body), kind, DefaultMaxTokens)
		if tc.check != nil {
			if err != nil {
				t.Errorf("%s: %v", name, err)
			} else if !tc.check(c.job) {
				t.Errorf("%s: job %+v", name, c.job)
			}
			continue
		}
		e := apiErrorOf(err)
		if err == nil || e.status != 400 || paramOf(e) != tc.param || !strings.Contains(err.Error(), tc.inMsg) {
			t.Errorf("%s: got %v (param %q), want a 400 naming %q that says %q", name, err, paramOf(e), tc.param, tc.inMsg)
		}
	}
}
