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
		// The arguments end where their JSON does: a marker inside a
		// string is the string's. The second call's arguments are a
		// string holding JSON, read whole.
		{"hermes two", Hermes, "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": \"</tool_call>\"}}</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}\n</tool_call>",
			"\n",
			[]gotCall{{"add", `{"a": "</tool_call>"}`}, {"get_weather", `{"city": "Rome"}`}}},
		{"hermes arguments first", Hermes, "<tool_call>{\"arguments\": {\"a\": [1, {\"b\": null}]}, \"name\": \"add\"}</tool_call>", "",
			[]gotCall{{"add", `{"a": [1, {"b": null}]}`}}},
		{"hermes no closing marker", Hermes, "<tool_call>{\"name\": \"add\", \"arguments\": {}}\nDone.", "Done.", []gotCall{{"add", `{}`}}},
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
		{"deepseek two", DeepSeekV3, "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Oslo\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n{\"a\": 1.5e3}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
			"Checking.", []gotCall{{"get_weather", `{"city": "Oslo"}`}, {"add", `{"a": 1.5e3}`}}},
		{"deepseek unknown name", DeepSeekV3, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>rm\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
			"functionrm\n```json\n{}\n```", nil},
		{"deepseek stray markers", DeepSeekV3, "a<｜tool▁sep｜>b<｜tool▁call▁end｜>c<｜tool▁ca", "abc<｜tool▁ca", nil},
		{"mistral two", Mistral, "[TOOL_CALLS] [{\"name\": \"add\", \"arguments\": {\"a\": 1}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]",
			"", []gotCall{{"add", `{"a": 1}`}, {"get_weather", `{"city": "Oslo"}`}}},
		{"mistral read whole", Mistral, "[TOOL_CALLS][{\"arguments\": {\"a\": 1}, \"name\": \"add\"}, {\"name\": \"get_weather\"}]",
			"", []gotCall{{"add", `{"a": 1}`}, {"get_weather", `{}`}}},
		{"mistral not calls", Mistral, "x [TOOL_CALLS][1, 2] y", "x [1, 2] y", nil},
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

// TestParserStreams feeds each family's call a byte at a time: the
// first delta comes with the arguments' first byte, once the name is
// whole, and each byte of the arguments goes out with the push that
// brought it, nothing held back and nothing after them.
func TestParserStreams(t *testing.T) {
	const args = `{"city": "Oslo", "days": [1, 2.5e-1, true, null], "x": {"y": "\u00e9\""}}`
	for _, f := range Formats() {
		pre, suf, err := Syntax(f, "get_weather")
		if err != nil {
			t.Fatal(err)
		}
		text := "Let me see. " + pre + args + suf
		if f == Llama3JSON {
			text = pre + args + suf
		}
		p := NewParser(f, []string{"get_weather", "get"})
		var content strings.Builder
		var got strings.Builder
		argDeltas := 0
		for i := range len(text) {
			c, deltas := p.Push(text[i : i+1])
			content.WriteString(c)
			start := strings.Index(text, args)
			for _, d := range deltas {
				switch {
				case d.ID != "":
					if i != start || d.Name != "get_weather" || d.Index != 0 {
						t.Errorf("%s: first delta %+v at byte %d, want it at %d, the arguments' first", f, d, i, start)
					}
				case d.Arguments != text[i:i+1]:
					t.Errorf("%s: byte %d (%q) gave arguments %q", f, i, text[i:i+1], d.Arguments)
				default:
					argDeltas++
					got.WriteString(d.Arguments)
				}
			}
		}
		c, deltas := p.Flush()
		content.WriteString(c)
		if got.String() != args || argDeltas != len(args) || len(deltas) != 0 || p.Calls() != 1 || p.Whole() != 1 || p.Broken() {
			t.Errorf("%s: arguments %q in %d deltas (then %v at the end), calls %d; want %q a byte at a time", f, got.String(), argDeltas, deltas, p.Calls(), args)
		}
		if want := strings.TrimSuffix(text, pre+args+suf); content.String() != want {
			t.Errorf("%s: content %q, want %q", f, content.String(), want)
		}
	}
}

// TestParserBroken checks a call whose arguments break after they began
// to stream: it ends with what was sent, and the parser reads no more.
func TestParserBroken(t *testing.T) {
	p := NewParser(Hermes, []string{"add"})
	var deltas []infer.ToolCallDelta
	for _, piece := range []string{"<tool_call>{\"name\": \"ad", "d\"", ", \"arguments\": ", "{\"a\": 1", " x}}</tool_call>", " more"} {
		content, d := p.Push(piece)
		if content != "" {
			t.Errorf("push %q: content %q", piece, content)
		}
		if len(deltas) == 0 && len(d) > 0 && piece != "{\"a\": 1" {
			t.Errorf("the call opened at %q, before its arguments began", piece)
		}
		deltas = append(deltas, d...)
	}
	if c, d := p.Flush(); c != "" || len(d) != 0 {
		t.Errorf("flush: %q, %v", c, d)
	}
	if len(deltas) != 3 || deltas[0].Name != "add" || deltas[1].Arguments+deltas[2].Arguments != `{"a": 1 ` || !p.Broken() || p.Whole() != 0 || p.Calls() != 1 {
		t.Errorf("deltas %+v, broken %v; want add with {\"a\": 1 and broken", deltas, p.Broken())
	}
}

// TestParserBounds checks what a model controls: a header that never
// ends, brackets without end, a block read whole without end.
func TestParserBounds(t *testing.T) {
	p := NewParser(Hermes, []string{"add"})
	long := "<tool_call>{" + strings.Repeat(" ", 2*maxSyntaxBytes)
	content, _ := p.Push(long)
	content2, _ := p.Push(strings.Repeat("x", maxWholeBytes))
	if got := content + content2; got != long+strings.Repeat("x", maxWholeBytes) {
		t.Errorf("an endless header: %d bytes of content out of %d", len(got), len(long)+maxWholeBytes)
	}
	p = NewParser(Hermes, []string{"add"})
	p.Push("<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": " + strings.Repeat("[", 1000))
	if !p.Broken() || len(p.args.stack) > maxArgDepth {
		t.Errorf("brackets without end: broken %v, depth %d", p.Broken(), len(p.args.stack))
	}
}

// FuzzParser checks that whatever a model writes, cut anywhere, the
// parser loses no text outside calls (the families whose markers are
// text), answers well-formed calls, and that a call's deltas are a
// prefix of a JSON object however the text was cut.
func FuzzParser(f *testing.F) {
	f.Add("<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1}}</tool_call>", 3, 0)
	f.Add("{\"name\": \"add\", \"parameters\": {}}; {", 1, 1)
	f.Add("text <tool_call> more", 2, 0)
	f.Add("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n{\"a\": [1]}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>", 5, 2)
	f.Add("[TOOL_CALLS][{\"name\": \"add\", \"arguments\": {}}, {\"arguments\": {}, \"name\": \"add\"}]", 4, 3)
	f.Fuzz(func(t *testing.T, text string, n, family int) {
		formats := Formats()
		format := formats[(family%len(formats)+len(formats))%len(formats)]
		n = max(n%16, 1)
		content, calls := run(t, format, text, n)
		if len(calls) == 0 && content != text && (format == Hermes || format == Llama3JSON) {
			t.Errorf("no calls, content %q, want the text %q", content, text)
		}
		for i, c := range calls {
			var m map[string]any
			err := json.Unmarshal([]byte(c.args), &m)
			if i < len(calls)-1 && err != nil {
				t.Errorf("call %q: arguments are no object: %v", c.name, err)
			}
			if !strings.HasPrefix(c.args, "{") {
				t.Errorf("call %q: arguments %q do not open an object", c.name, c.args)
			}
		}
	})
}

// BenchmarkParser pushes a completion through the parser four bytes at a
// time, as tokens come: a call whose arguments stream, beside text of
// the same length that holds no call (the cost every token of a request
// with tools pays).
func BenchmarkParser(b *testing.B) {
	pre, suf, _ := Syntax(Hermes, "add")
	args := `{"items": [` + strings.Repeat(`{"n": 12345, "s": "abc\"def", "ok": true}, `, 40) + `null]}`
	for _, bc := range []struct{ name, text string }{
		{"text", strings.Repeat("x", len(pre+args+suf))},
		{"call", pre + args + suf},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(int64(len(bc.text)))
			for b.Loop() {
				p := NewParser(Hermes, []string{"add"})
				for i := 0; i < len(bc.text); i += 4 {
					p.Push(bc.text[i:min(i+4, len(bc.text))])
				}
				p.Flush()
			}
		})
	}
}
