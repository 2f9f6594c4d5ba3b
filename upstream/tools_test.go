package upstream

import (
	"encoding/json"
	"io"
	"net/http"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"

	"h3infer/infer"
)

const twoTools = `[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{},"additionalProperties":false}}},{"type":"function","function":{"name":"g"}}]`

// Tools, the tool choice, parallel_tool_calls and the history's calls go
// upstream as OpenAI writes them, and the calls the upstream streams back
// come through as deltas in order, with the finish reason tool_calls.
func TestToolsForwarded(t *testing.T) {
	f, url := newFake(t)
	s, _ := newTestSet(t, Options{}, testConfig("a", url))
	var body atomic.Value
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		body.Store(b)
		sseStart(w)
		sseData(w, `{"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"f","arguments":""}}]}}]}`)
		sseData(w, `{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}`)
		sseData(w, `{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"g","arguments":"{\"x\""}}]}}]}`)
		sseData(w, `{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":":1}"}}]},"finish_reason":"tool_calls"}]}`)
		sseData(w, "[DONE]")
	})
	req := chatRequest("m")
	req.Messages = append(req.Messages,
		infer.ChatMessage{Role: "assistant", ToolCalls: []infer.ToolCall{{ID: "call_0", Name: "g", Arguments: `{"x":0}`}}},
		infer.ChatMessage{Role: "tool", Content: "done", ToolCallID: "call_0"})
	req.Tools = twoTools
	evs := run(t, s, req)

	var sent map[string]any
	if err := json.Unmarshal(body.Load().([]byte), &sent); err != nil {
		t.Fatal(err)
	}
	var wantTools, wantMsgs any
	json.Unmarshal([]byte(twoTools), &wantTools)
	json.Unmarshal([]byte(`[{"role":"user","content":"hi"},
		{"role":"assistant","content":null,"tool_calls":[{"id":"call_0","type":"function","function":{"name":"g","arguments":"{\"x\":0}"}}]},
		{"role":"tool","content":"done","tool_call_id":"call_0"}]`), &wantMsgs)
	if !reflect.DeepEqual(sent["tools"], wantTools) || !reflect.DeepEqual(sent["messages"], wantMsgs) || sent["tool_choice"] != nil || sent["parallel_tool_calls"] != nil {
		t.Errorf("sent upstream: tools %v, messages %v, tool_choice %v, parallel_tool_calls %v", sent["tools"], sent["messages"], sent["tool_choice"], sent["parallel_tool_calls"])
	}
	var got []infer.ToolCallDelta
	for _, ev := range evs {
		got = append(got, ev.Token.ToolCalls...)
	}
	want := []infer.ToolCallDelta{
		{Index: 0, ID: "call_a", Name: "f"}, {Index: 0, Arguments: "{}"},
		{Index: 1, ID: "call_b", Name: "g", Arguments: `{"x"`}, {Index: 1, Arguments: ":1}"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("deltas %+v,\nwant %+v", got, want)
	}
	if d := last(t, evs).Done; d == nil || d.FinishReason != infer.FinishToolCalls || d.CompletionTokens != 4 {
		t.Errorf("ended with %+v, want done tool_calls after 4 tokens", last(t, evs))
	}

	// A named function and parallel_tool_calls false, in OpenAI's shapes.
	req.ToolChoice, req.ToolName, req.SerialToolCalls = infer.ToolFunction, "f", true
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		body.Store(b)
		streamTokens("x")(w, r)
	})
	run(t, s, req)
	if b := string(body.Load().([]byte)); !strings.Contains(b, `"tool_choice":{"type":"function","function":{"name":"f"}},"parallel_tool_calls":false`) {
		t.Errorf("sent upstream: %s", b)
	}
}

// Calls the request does not allow are a malformed stream, never passed
// on: a function it did not offer (or not the one it named), calls when it
// offered none, a second call after parallel_tool_calls false, arguments
// of a call not opened, calls out of order, and more than maxCalls.
func TestToolCallsHostile(t *testing.T) {
	f, url := newFake(t)
	s, reg := newTestSet(t, Options{}, testConfig("a", url))
	var answer atomic.Value
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		sseStart(w)
		for _, c := range answer.Load().([]string) {
			sseData(w, c)
		}
		sseData(w, "[DONE]")
	})
	open := func(i int, name string) string {
		return `{"choices":[{"delta":{"tool_calls":[{"index":` + string(rune('0'+i)) + `,"id":"c","type":"function","function":{"name":"` + name + `"}}]}}]}`
	}
	many := `{"choices":[{"delta":{"tool_calls":[`
	for i := range maxCalls + 1 {
		if i > 0 {
			many += ","
		}
		many += `{"index":` + itoa(i) + `,"id":"c","function":{"name":"f"}}`
	}
	many += `]}}]}`
	cases := []struct {
		name   string
		set    func(*infer.Request)
		chunks []string
	}{
		{"not offered", nil, []string{open(0, "h")}},
		{"not the named", func(r *infer.Request) { r.ToolChoice, r.ToolName = infer.ToolFunction, "g" }, []string{open(0, "f")}},
		{"no tools", func(r *infer.Request) { r.Tools = "" }, []string{open(0, "f")}},
		{"tool_choice none", func(r *infer.Request) { r.ToolChoice = infer.ToolNone }, []string{open(0, "f")}},
		{"serial", func(r *infer.Request) { r.SerialToolCalls = true }, []string{open(0, "f"), open(1, "g")}},
		{"arguments first", nil, []string{`{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}`}},
		{"out of order", nil, []string{open(1, "f")}},
		{"no index", nil, []string{`{"choices":[{"delta":{"tool_calls":[{"id":"c","function":{"name":"f"}}]}}]}`}},
		{"too many", nil, []string{many}},
	}
	for _, tc := range cases {
		answer.Store(tc.chunks)
		req := chatRequest("m")
		req.Tools = twoTools
		if tc.set != nil {
			tc.set(req)
		}
		evs := run(t, s, req)
		if e := last(t, evs).Err; e == nil || e.Code != infer.CodeUpstreamLost || len(evs) > 2 {
			t.Errorf("%s: events %+v, want upstream_lost", tc.name, evs)
		}
		for _, ev := range evs {
			if len(ev.Token.ToolCalls) > 0 && tc.name != "serial" {
				t.Errorf("%s: a call was passed on: %+v", tc.name, ev.Token.ToolCalls)
			}
		}
	}
	if got := counter(t, reg, "h3infer_upstream_errors_total", "upstream", "a", "kind", kindMalformed); got != float64(len(cases)) {
		t.Errorf("errors_total{malformed}: got %v, want %d", got, len(cases))
	}
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }
