package tokenize

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ardanlabs/jinja"

	"h3infer/infer"
)

// Files of a model directory that may hold its own chat template, as
// Hugging Face's transformers saves them.
const (
	// TokenizerConfigFile holds chat_template (a string, or a list of
	// {name, template} of which "default" is the chat one) and the
	// bos_token and eos_token the template writes.
	TokenizerConfigFile = "tokenizer_config.json"
	// ChatTemplateFile is the template alone, which newer model
	// repositories ship; like transformers, it wins over
	// tokenizer_config.json's chat_template.
	ChatTemplateFile = "chat_template.jinja"
)

// jinjaTemplate is a model's own Jinja chat template, compiled once and
// rendered with the variables transformers' apply_chat_template gives it.
type jinjaTemplate struct {
	file     string
	tmpl     *jinja.Template
	bos, eos string           // "" when the model's files set none
	now      func() time.Time // strftime_now's clock
	// src is the template's text, where a model family's tool call
	// markers show (ChatTemplate.Source).
	src string
	// noneContent: the template asks whether a message's content is
	// none (toolMessage).
	noneContent bool
}

// LoadJinja reads the chat template dir's model files carry:
// chat_template.jinja, else tokenizer_config.json's chat_template, with
// tokenizer_config.json's bos_token and eos_token. It returns nil and no
// error when there is none. A template that does not compile, or fails
// on a one-message conversation for another reason than
// raise_exception, is an error naming its file.
func LoadJinja(dir string) (*ChatTemplate, error) {
	cfgPath := filepath.Join(dir, TokenizerConfigFile)
	var cfg tokenizerConfig
	data, err := os.ReadFile(cfgPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("read chat template: %w", err)
	default:
		if cfg, err = parseTokenizerConfig(data); err != nil {
			return nil, fmt.Errorf("%s: %w", cfgPath, err)
		}
	}
	file, src := cfgPath, cfg.template
	tmplPath := filepath.Join(dir, ChatTemplateFile)
	switch data, err := os.ReadFile(tmplPath); {
	case err == nil:
		file, src = tmplPath, string(data)
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("read chat template: %w", err)
	case cfg.template == "":
		return nil, nil
	}
	return compileJinja(file, src, cfg.bos, cfg.eos)
}

// compileJinja compiles src, read from file, and checks that it renders a
// one-message conversation.
func compileJinja(file, src, bos, eos string) (*ChatTemplate, error) {
	tmpl, err := jinja.Compile(src)
	if err != nil {
		return nil, fmt.Errorf("%s: chat_template: %w", file, err)
	}
	j := &jinjaTemplate{file: file, tmpl: tmpl, bos: bos, eos: eos, now: time.Now, src: src, noneContent: asksNoneContent.MatchString(src)}
	t := &ChatTemplate{File: file, EndOfTurn: eos, jinja: j}
	for _, tok := range []string{bos, eos} {
		if tok != "" && !slices.Contains(t.Markers, tok) {
			t.Markers = append(t.Markers, tok)
		}
	}
	// Most mistakes of a template only show when it runs (an unknown
	// filter, a method the engine lacks): find them at load, not on the
	// first request.
	_, err = t.Render([]infer.ChatMessage{{Role: "user", Content: "Hello"}}, true)
	if _, refused := errors.AsType[*ConversationError](err); err != nil && !refused {
		return nil, fmt.Errorf("%s: chat_template: rendering a one-message conversation: %w", file, err)
	}
	return t, nil
}

// render runs the template with what transformers' apply_chat_template
// passes: messages, add_generation_prompt, tools and documents (none: the
// gateway takes neither), the special tokens, raise_exception and
// strftime_now.
//
// Message content is data: it is bound to a variable and printed, never
// parsed as template code, so "{{ x }}" in a message stays those
// characters.
func (j *jinjaTemplate) render(msgs []infer.ChatMessage, addGenerationPrompt bool) (out string, err error) {
	return j.renderTools(msgs, jinja.None(), addGenerationPrompt)
}

// renderTools is render with tools given to the template (None when the
// request has none), and each message's tool calls and tool call id in
// the shapes transformers passes them (toolMessage).
func (j *jinjaTemplate) renderTools(msgs []infer.ChatMessage, tools jinja.Value, addGenerationPrompt bool) (out string, err error) {
	list := make([]jinja.Value, len(msgs))
	for i, m := range msgs {
		list[i] = toolMessage(m, j.noneContent)
	}
	vars := map[string]jinja.Value{
		"messages":              jinja.NewList(list),
		"add_generation_prompt": jinja.NewBool(addGenerationPrompt),
		"tools":                 tools,
		"documents":             jinja.None(),
		"raise_exception":       jinja.NewCallable("raise_exception", raiseException),
		"strftime_now": jinja.NewCallable("strftime_now", func(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
			if len(args) != 1 || !args[0].IsString() {
				return jinja.Undefined(), errors.New("strftime_now: want one format string")
			}
			return jinja.NewString(strftime(j.now(), args[0].AsString())), nil
		}),
	}
	// transformers passes the special tokens the tokenizer has; one it
	// lacks (Qwen's bos_token: null) is undefined in the template.
	if j.bos != "" {
		vars["bos_token"] = jinja.NewString(j.bos)
	}
	if j.eos != "" {
		vars["eos_token"] = jinja.NewString(j.eos)
	}
	// The engine type-asserts values as it evaluates them; a template
	// meeting a value it did not expect must fail this request, not the
	// worker that serves every other one.
	defer func() {
		if r := recover(); r != nil {
			out, err = "", fmt.Errorf("chat template %s: panic: %v", j.file, r)
		}
	}()
	out, err = j.tmpl.RenderValues(vars)
	if err != nil {
		if ce, ok := errors.AsType[*ConversationError](err); ok {
			return "", ce
		}
		return "", fmt.Errorf("chat template %s: %w", j.file, err)
	}
	return out, nil
}

// raiseException is the templates' way to refuse a conversation
// ("Conversation roles must alternate user/assistant/..."): the request's
// fault, answered 400 with the template's message.
func raiseException(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	msg := "the model's chat template refused the conversation"
	if len(args) > 0 {
		if args[0].IsString() {
			msg = args[0].AsString()
		} else {
			msg = args[0].String()
		}
	}
	return jinja.Undefined(), &ConversationError{msg}
}

// strftime formats t as Python's datetime.strftime does for the
// directives chat templates use ("%d %b %Y", "%Y-%m-%d"); others are
// written as they stand.
func strftime(t time.Time, format string) string {
	var b strings.Builder
	for i := 0; i < len(format); i++ {
		c := format[i]
		if c != '%' || i+1 == len(format) {
			b.WriteByte(c)
			continue
		}
		i++
		pad := func(n, width int) {
			s := strconv.Itoa(n)
			for range width - len(s) {
				b.WriteByte('0')
			}
			b.WriteString(s)
		}
		switch format[i] {
		case 'Y':
			pad(t.Year(), 4)
		case 'y':
			pad(t.Year()%100, 2)
		case 'm':
			pad(int(t.Month()), 2)
		case 'd':
			pad(t.Day(), 2)
		case 'B':
			b.WriteString(t.Month().String())
		case 'b':
			b.WriteString(t.Month().String()[:3])
		case 'A':
			b.WriteString(t.Weekday().String())
		case 'a':
			b.WriteString(t.Weekday().String()[:3])
		case 'H':
			pad(t.Hour(), 2)
		case 'I':
			pad((t.Hour()+11)%12+1, 2)
		case 'p':
			if t.Hour() < 12 {
				b.WriteString("AM")
			} else {
				b.WriteString("PM")
			}
		case 'M':
			pad(t.Minute(), 2)
		case 'S':
			pad(t.Second(), 2)
		case 'j':
			pad(t.YearDay(), 3)
		case '%':
			b.WriteByte('%')
		default:
			b.WriteByte('%')
			b.WriteByte(format[i])
		}
	}
	return b.String()
}

// tokenizerConfig is what a chat template needs of tokenizer_config.json.
type tokenizerConfig struct {
	template string
	bos, eos string
}

// parseTokenizerConfig reads chat_template, bos_token and eos_token of a
// tokenizer_config.json; its other keys are the tokenizer's business.
func parseTokenizerConfig(data []byte) (tokenizerConfig, error) {
	var raw struct {
		ChatTemplate json.RawMessage `json:"chat_template"`
		BOSToken     json.RawMessage `json:"bos_token"`
		EOSToken     json.RawMessage `json:"eos_token"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return tokenizerConfig{}, fmt.Errorf("decode: %w", err)
	}
	var c tokenizerConfig
	var errs []error
	var err error
	if c.template, err = parseChatTemplate(raw.ChatTemplate); err != nil {
		errs = append(errs, fmt.Errorf("chat_template: %w", err))
	}
	if c.bos, err = parseSpecialToken(raw.BOSToken); err != nil {
		errs = append(errs, fmt.Errorf("bos_token: %w", err))
	}
	if c.eos, err = parseSpecialToken(raw.EOSToken); err != nil {
		errs = append(errs, fmt.Errorf("eos_token: %w", err))
	}
	return c, errors.Join(errs...)
}

// parseChatTemplate reads chat_template: absent or null, a string, or a
// list of named templates of which transformers formats chats with
// "default" (others, such as "tool_use" and "rag", need requests the
// gateway does not take).
func parseChatTemplate(raw json.RawMessage) (string, error) {
	if isNull(raw) {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var list []struct {
		Name     string `json:"name"`
		Template string `json:"template"`
	}
	if err := json.Unmarshal(raw, &list); err != nil {
		return "", errors.New("must be a string or a list of {\"name\", \"template\"}")
	}
	var names []string
	for _, t := range list {
		if t.Name == "default" {
			return t.Template, nil
		}
		names = append(names, strconv.Quote(t.Name))
	}
	return "", fmt.Errorf("a list of templates (%s) without one named \"default\"", strings.Join(names, ", "))
}

// parseSpecialToken reads a bos_token or eos_token: absent or null, a
// string, or an AddedToken object {"content": ...}.
func parseSpecialToken(raw json.RawMessage) (string, error) {
	if isNull(raw) {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var tok struct {
		Content *string `json:"content"`
	}
	if err := json.Unmarshal(raw, &tok); err != nil || tok.Content == nil {
		return "", errors.New("must be a string or an object with a string \"content\"")
	}
	return *tok.Content, nil
}
