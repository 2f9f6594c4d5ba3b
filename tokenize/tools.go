package tokenize

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/ardanlabs/jinja"

	"h3infer/infer"
)

// Tools reach a model's own Jinja template as transformers'
// apply_chat_template passes them, the shapes Hugging Face templates are
// written for: tools is the request's list of {"type": "function",
// "function": {"name", "description", "parameters"}}, an assistant
// message's calls are message.tool_calls, a list of {"id", "type":
// "function", "function": {"name", "arguments"}} with the arguments as
// the JSON text OpenAI's API carries them in, and a tool message answers
// message.tool_call_id. An assistant message that made calls and said
// nothing has content "" rather than OpenAI's null: most templates test
// it as a string ('</think>' in message.content, message.content|trim),
// and refuse None. A template that asks whether the content is none
// (DeepSeek V3's writes an assistant's calls only then) gets None for
// such a message, as transformers gives it OpenAI's null.

// ErrNoTools is a template that cannot be given tools: a named template,
// or a Jinja template whose text never mentions them.
var ErrNoTools = errors.New("the model's chat template does not take tools")

// TakesTools reports whether the template renders a request's tools.
func (t *ChatTemplate) TakesTools() bool {
	return t.jinja != nil && strings.Contains(t.jinja.src, "tools")
}

// Source is a Jinja template's text; "" for a named template.
func (t *ChatTemplate) Source() string {
	if t.jinja == nil {
		return ""
	}
	return t.jinja.src
}

// RenderTools is Render with tools, a JSON array of tool definitions
// (infer.Request.Tools), given to the template; with tools "" it is
// Render. A template that does not take tools refuses with ErrNoTools
// inside a *ConversationError.
func (t *ChatTemplate) RenderTools(msgs []infer.ChatMessage, tools string, addGenerationPrompt bool) (string, error) {
	if tools == "" {
		return t.Render(msgs, addGenerationPrompt)
	}
	if !t.TakesTools() {
		return "", &ConversationError{fmt.Sprintf("tools: %v (%s)", ErrNoTools, t)}
	}
	v, err := jsonValue([]byte(tools))
	if err != nil {
		return "", fmt.Errorf("tools: %w", err)
	}
	return t.jinja.renderTools(msgs, v, addGenerationPrompt)
}

// asksNoneContent matches a template's test that a message's content is
// none (not "is not none", which a string passes too).
var asksNoneContent = regexp.MustCompile(`content(?:'\]|"\])?\s+is\s+none\b`)

// NoneForSilentCalls reports whether the template is given None as the
// content of an assistant message that made calls and said nothing.
func (t *ChatTemplate) NoneForSilentCalls() bool {
	return t.jinja != nil && t.jinja.noneContent
}

// toolMessage is m as a template's messages hold it; noneContent gives a
// message that made calls and said nothing None for its content.
func toolMessage(m infer.ChatMessage, noneContent bool) jinja.Value {
	d := jinja.NewDict()
	dict := d.AsDict()
	dict.Set("role", jinja.NewString(m.Role))
	if noneContent && m.Content == "" && len(m.ToolCalls) > 0 {
		dict.Set("content", jinja.None())
	} else {
		dict.Set("content", jinja.NewString(m.Content))
	}
	if len(m.ToolCalls) > 0 {
		calls := make([]jinja.Value, len(m.ToolCalls))
		for i, c := range m.ToolCalls {
			fn := jinja.NewDict()
			fn.AsDict().Set("name", jinja.NewString(c.Name))
			fn.AsDict().Set("arguments", jinja.NewString(c.Arguments))
			call := jinja.NewDict()
			call.AsDict().Set("id", jinja.NewString(c.ID))
			call.AsDict().Set("type", jinja.NewString("function"))
			call.AsDict().Set("function", fn)
			calls[i] = call
		}
		dict.Set("tool_calls", jinja.NewList(calls))
	}
	if m.ToolCallID != "" {
		dict.Set("tool_call_id", jinja.NewString(m.ToolCallID))
	}
	return d
}

// jsonValue is the JSON text raw as a template value, objects keeping
// their keys' order (a template's tojson writes them in it).
func jsonValue(raw []byte) (jinja.Value, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	v, err := decodeValue(dec)
	if err != nil {
		return jinja.Undefined(), err
	}
	if dec.More() {
		return jinja.Undefined(), errors.New("trailing data after the JSON value")
	}
	return v, nil
}

func decodeValue(dec *json.Decoder) (jinja.Value, error) {
	tok, err := dec.Token()
	if err != nil {
		return jinja.Undefined(), err
	}
	switch x := tok.(type) {
	case json.Delim:
		if x == '[' {
			var items []jinja.Value
			for dec.More() {
				v, err := decodeValue(dec)
				if err != nil {
					return jinja.Undefined(), err
				}
				items = append(items, v)
			}
			_, err := dec.Token()
			return jinja.NewList(items), err
		}
		d := jinja.NewDict()
		for dec.More() {
			k, err := dec.Token()
			if err != nil {
				return jinja.Undefined(), err
			}
			v, err := decodeValue(dec)
			if err != nil {
				return jinja.Undefined(), err
			}
			d.AsDict().Set(k.(string), v)
		}
		_, err := dec.Token()
		return d, err
	case string:
		return jinja.NewString(x), nil
	case bool:
		return jinja.NewBool(x), nil
	case json.Number:
		if i, err := x.Int64(); err == nil {
			return jinja.NewInt(i), nil
		}
		f, err := x.Float64()
		return jinja.NewFloat(f), err
	}
	return jinja.None(), nil
}
