package toolcall

import (
	"encoding/json"
	"strings"
	"testing"

	"h3infer/infer"
)

type gotCall struct{ name, args string }

// run feeds text to a parser in pieces of size n (all at once when n is
// 0) and gathers what it answers, checking the deltas' shape.
func run(t *testing.T, format, text string, n int) (string, []gotCall) {
	t.Helper()
	p := NewParser(format, []string{"get_weather", "add"})
	var content strings.Builder
	var deltas []infer.ToolCallDelta
	push := func(c string, d []infer.ToolCallDelta) {
		content.WriteString(c)
		deltas = append(deltas, d...)
	}
	for i := 0; i < len(text); {
		j := len(text)
		if n > 0 {
			j = min(i+n, len(text))
		}
		push(p.Push(text[i:j]))
		i = j
	}
	push(p.Flush())
	var calls []gotCall
	for _, d := range deltas {
		switch {
		case d.ID != "":
			if int(d.Index) != len(calls) || d.Name == "" || d.Arguments != "" || !strings.HasPrefix(d.ID, "call_") {
				t.Fatalf("first delta %+v: want index %d, an id, a name and no arguments", d, len(calls))
			}
			calls = append(calls, gotCall{name: d.Name})
		default:
			if len(calls) == 0 || int(d.Index) != len(calls)-1 || d.Name != "" {
				t.Fatalf("delta %+v follows no call's first delta", d)
			}
			calls[len(calls)-1].args += d.Arguments
		}
	}
	if p.Calls() != len(calls) {
		t.Errorf("Calls() = %d, answered %d", p.Calls(), len(calls))
	}
	return content.String(), calls
}

func TestParser(t *testing.T) {
	for _, tc := range []struct {
		name, format, text, content string
		calls                       []gotCall
	}{
		{"hermes one", Hermes, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>", "",
			[]gotCall{{"get_weather", `{"city": "Oslo"}`}}},
		{"hermes text around", Hermes, "Let me check. <tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1,\"b\":2}}</tool_call> done", "Let me check.  done",
			[]gotCall{{"add", `{"a":1,"b":2}`}}},
		// Hermes has no escape for its closing marker: the first body
		// ends inside a string, is no JSON and so is content.
		{"hermes two", Hermes, "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": \"</tool_call>\"}}</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}\n</tool_call>",
			"<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": \"</tool_call>\"}}</tool_call>\n",
			[]gotCall{{"get_weather", `{"city": "Rome"}`}}},
		{"hermes unknown name", Hermes, "<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>", "<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>", nil},
		{"hermes bad json", Hermes, "a <tool_call>{not json</tool_call> b", "a <tool_call>{not json</tool_call> b", nil},
		{"hermes unclosed at end", Hermes, "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}\n", "", []gotCall{{"add", `{"a": 1}`}}},
		{"hermes cut short", Hermes, "<tool_call>\n{\"name\": \"add\", \"argu", "<tool_call>\n{\"name\": \"add\", \"argu", nil},
		{"hermes partial marker", Hermes, "x <tool_ca", "x <tool_ca", nil},
		{"hermes no arguments", Hermes, "<tool_call>{\"name\": \"add\"}</tool_call>", "", []gotCall{{"add", `{}`}}},
		{"hermes array arguments", Hermes, "<tool_call>{\"name\": \"add\", \"arguments\": [1]}</tool_call>", "<tool_call>{\"name\": \"add\", \"arguments\": [1]}</tool_call>", nil},
		{"llama one", Llama3JSON, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}", "", []gotCall{{"get_weather", `{"city": "Oslo"}`}}},
		{"llama two", Llama3JSON, " {\"name\": \"add\", \"parameters\": {\"a\": \"{;}\"}}; {\"name\": \"get_weather\", \"parameters\": {}}", "",
			[]gotCall{{"add", `{"a": "{;}"}`}, {"get_weather", `{}`}}},
		{"llama prose", Llama3JSON, "The answer is {\"name\": \"add\"}", "The answer is {\"name\": \"add\"}", nil},
		{"llama not a call", Llama3JSON, "{\"x\": 1} and more", "{\"x\": 1} and more", nil},
	} {
		for _, n := range []int{0, 1, 3, 7} {
			content, calls := run(t, tc.format, tc.text, n)
			if content != tc.content {
				t.Errorf("%s (pieces of %d): content %q, want %q", tc.name, n, content, tc.content)
			}
			if len(calls) != len(tc.calls) {
				t.Errorf("%s (pieces of %d): calls %q, want %q", tc.name, n, calls, tc.calls)
				continue
			}
			for i := range calls {
				if calls[i] != tc.calls[i] {
					t.Errorf("%s (pieces of %d): call %d %q, want %q", tc.name, n, i, calls[i], tc.calls[i])
				}
			}
		}
	}
}

// TestSyntaxParses checks that what constrained decoding forces is what
// the parser reads back as a call, for every family.
func TestSyntaxParses(t *testing.T) {
	for _, f := range Formats() {
		pre, suf, err := Syntax(f, "get_weather")
		if err != nil {
			t.Fatal(err)
		}
		content, calls := run(t, f, pre+`{"city":"Oslo"}`+suf, 2)
		if content != "" || len(calls) != 1 || calls[0] != (gotCall{"get_weather", `{"city":"Oslo"}`}) {
			t.Errorf("%s: content %q, calls %q", f, content, calls)
		}
	}
	if _, _, err := Syntax("nope", "f"); err == nil {
		t.Error("an unknown format has a syntax")
	}
}

func TestDetect(t *testing.T) {
	for tmpl, want := range map[string]string{
		`{{- "<tool_call>\n" }}`:                   Hermes,
		`{{- "<|python_tag|>" + tool_call.name }}`: Llama3JSON,
		`{%- if message.role == "ipython" %}{"name": function name, "parameters": dict}`: Llama3JSON,
		`{{ messages[0].content }}`: "",
	} {
		if got := Detect(tmpl); got != want {
			t.Errorf("Detect(%q) = %q, want %q", tmpl, got, want)
		}
	}
}

// FuzzParser checks that whatever a model writes, cut anywhere, the
// parser loses no text outside calls and answers well-formed calls.
func FuzzParser(f *testing.F) {
	f.Add("<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1}}</tool_call>", 3, false)
	f.Add("{\"name\": \"add\", \"parameters\": {}}; {", 1, true)
	f.Add("text <tool_call> more", 2, false)
	f.Fuzz(func(t *testing.T, text string, n int, llama bool) {
		format := Hermes
		if llama {
			format = Llama3JSON
		}
		n = max(n%16, 1)
		content, calls := run(t, format, text, n)
		if len(calls) == 0 && content != text {
			t.Errorf("no calls, content %q, want the text %q", content, text)
		}
		for _, c := range calls {
			var m map[string]any
			if err := json.Unmarshal([]byte(c.args), &m); err != nil {
				t.Errorf("call %q: arguments are no object: %v", c.name, err)
			}
		}
	})
}
