package tokenize

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"h3infer/infer"
)

func TestLoadJinja(t *testing.T) {
	const chatml = `{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}`
	user := []infer.ChatMessage{{Role: "user", Content: "Hi"}}
	tests := []struct {
		name  string
		files map[string]string
		// want is the rendering of user with the generation prompt; ""
		// means LoadJinja finds no template.
		want    string
		eot     string
		file    string // the file the template comes from
		wantErr string // part of the error, naming what is wrong
	}{
		{name: "no files"},
		{name: "config without template", files: map[string]string{TokenizerConfigFile: `{"eos_token": "</s>", "chat_template": null}`}},
		{
			name:  "string template, AddedToken eos",
			files: map[string]string{TokenizerConfigFile: `{"chat_template": "` + chatml + `", "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": false}}`},
			want:  "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", eot: "<|im_end|>", file: TokenizerConfigFile,
		},
		{
			name: "list with a default",
			files: map[string]string{TokenizerConfigFile: `{"eos_token": "</s>", "bos_token": "<s>", "chat_template": [
				{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}]}`},
			want: "<s>Hi</s>", eot: "</s>", file: TokenizerConfigFile,
		},
		{
			name:    "list without a default",
			files:   map[string]string{TokenizerConfigFile: `{"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "rag", "template": "y"}]}`},
			wantErr: `chat_template: a list of templates ("tool_use", "rag") without one named "default"`,
		},
		{
			name: "chat_template.jinja wins",
			files: map[string]string{
				TokenizerConfigFile: `{"chat_template": "from the config", "eos_token": "<|im_end|>"}`,
				ChatTemplateFile:    strings.ReplaceAll(chatml, `\n`, "\n"),
			},
			want: "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", eot: "<|im_end|>", file: ChatTemplateFile,
		},
		{
			name:  "chat_template.jinja alone",
			files: map[string]string{ChatTemplateFile: "{{ bos_token is defined }} {{ messages[0].content }}"},
			want:  "False Hi", file: ChatTemplateFile,
		},
		{
			name:    "does not compile",
			files:   map[string]string{ChatTemplateFile: "{% for m in messages %}{{ m.content }}"},
			wantErr: ChatTemplateFile + ": chat_template: ",
		},
		{
			name:    "unknown filter",
			files:   map[string]string{TokenizerConfigFile: `{"chat_template": "{{ messages[0].content | shout }}"}`},
			wantErr: TokenizerConfigFile + ": chat_template: rendering a one-message conversation: ",
		},
		{
			name:    "bad special tokens",
			files:   map[string]string{TokenizerConfigFile: `{"chat_template": "x", "bos_token": 1, "eos_token": {"lstrip": false}}`},
			wantErr: "bos_token: must be a string or an object with a string \"content\"\neos_token: must be a string",
		},
		{
			name:    "not JSON",
			files:   map[string]string{TokenizerConfigFile: `{"chat_template": `},
			wantErr: TokenizerConfigFile + ": decode: ",
		},
		{
			// A template may refuse even the probe conversation: that is
			// its right, not a broken template.
			name:  "refuses a lone user message",
			files: map[string]string{ChatTemplateFile: "{% if messages[0].role != 'system' %}{{ raise_exception('a system message comes first') }}{% endif %}ok"},
			file:  ChatTemplateFile,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, content := range tc.files {
				if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			tmpl, err := LoadJinja(dir)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.file == "" {
				if tmpl != nil {
					t.Fatalf("got template %v, want none", tmpl)
				}
				return
			}
			if tmpl == nil {
				t.Fatal("got no template")
			}
			if want := filepath.Join(dir, tc.file); tmpl.File != want || tmpl.EndOfTurn != tc.eot {
				t.Errorf("got file %q, end of turn %q; want %q, %q", tmpl.File, tmpl.EndOfTurn, want, tc.eot)
			}
			got, err := tmpl.Render(user, true)
			if tc.want == "" {
				if _, ok := errors.AsType[*ConversationError](err); !ok {
					t.Errorf("got %q, %v; want a *ConversationError", got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

// TestJinjaContentIsData checks that what a client writes is never
// template code: message content that looks like Jinja comes out as
// written, and a raise_exception in it refuses nothing.
func TestJinjaContentIsData(t *testing.T) {
	tmpl, err := compileJinja("t.jinja", "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}", "", "")
	if err != nil {
		t.Fatal(err)
	}
	for _, content := range []string{
		"{{ raise_exception('boom') }}",
		"{% for i in range(100000000) %}x{% endfor %}",
		"{{ messages }}{# comment #}{%- raw %}",
		"}}{{", "{%", "{{",
	} {
		got, err := tmpl.Render([]infer.ChatMessage{{Role: "{{ role }}", Content: content}}, false)
		if want := "[{{ role }}]" + content; err != nil || got != want {
			t.Errorf("got %q, %v; want %q", got, err, want)
		}
	}
}

func TestJinjaRaiseException(t *testing.T) {
	tmpl, err := compileJinja("t.jinja", "{% if messages|length > 1 %}{{ raise_exception('only one message, got ' ~ messages|length) }}{% endif %}{{ messages[0].content }}", "", "")
	if err != nil {
		t.Fatal(err)
	}
	_, err = tmpl.Render([]infer.ChatMessage{{Role: "user", Content: "a"}, {Role: "user", Content: "b"}}, true)
	if ce, ok := errors.AsType[*ConversationError](err); !ok || ce.Message != "only one message, got 2" {
		t.Errorf("got %v, want a *ConversationError with the template's message", err)
	}
	// An error of the template itself is the model's, not the request's.
	tmpl, err = compileJinja("t.jinja", "{% if messages|length > 1 %}{{ messages[0].content.nosuchmethod() }}{% endif %}ok", "", "")
	if err != nil {
		t.Fatal(err)
	}
	_, err = tmpl.Render([]infer.ChatMessage{{Role: "user", Content: "a"}, {Role: "user", Content: "b"}}, true)
	if _, ok := errors.AsType[*ConversationError](err); ok || err == nil || !strings.Contains(err.Error(), "t.jinja") {
		t.Errorf("got %v, want an error naming the template that is no *ConversationError", err)
	}
}

func TestStrftime(t *testing.T) {
	at := time.Date(2024, time.July, 6, 15, 4, 5, 0, time.UTC)
	tests := map[string]string{
		"%d %b %Y":            "06 Jul 2024",
		"%Y-%m-%d":            "2024-07-06",
		"%A %a %B %y":         "Saturday Sat July 24",
		"%H:%M:%S %I%p %j %%": "15:04:05 03PM 188 %",
		"2006 %q %":           "2006 %q %",
	}
	for format, want := range tests {
		if got := strftime(at, format); got != want {
			t.Errorf("strftime(%q) = %q, want %q", format, got, want)
		}
	}
}

// FuzzJinjaRender renders arbitrary conversations with real models'
// templates (those of testdata/ref): content is client data, so no
// content may panic the renderer or fail it otherwise than with the
// template's own raise_exception.
func FuzzJinjaRender(f *testing.F) {
	var templates []*ChatTemplate
	for _, r := range refTemplates(f) {
		templates = append(templates, r.tmpl)
	}
	for _, msgs := range refConversations() {
		var roles []byte
		var contents []string
		for _, m := range msgs {
			roles = append(roles, byte(strings.Index("suat", m.Role[:1])))
			contents = append(contents, m.Content)
		}
		for len(contents) < 3 {
			contents = append(contents, "")
		}
		f.Add(roles, contents[0], contents[1], contents[2], true)
	}
	roleNames := []string{"system", "user", "assistant", "tool"}
	f.Fuzz(func(t *testing.T, roles []byte, a, b, c string, gen bool) {
		if len(roles) > 8 {
			roles = roles[:8]
		}
		contents := []string{a, b, c}
		var msgs []infer.ChatMessage
		for i, r := range roles {
			msgs = append(msgs, infer.ChatMessage{Role: roleNames[int(r)%len(roleNames)], Content: contents[i%3]})
		}
		if len(msgs) == 0 {
			msgs = []infer.ChatMessage{{Role: "user", Content: a}}
		}
		for _, tmpl := range templates {
			if _, err := tmpl.Render(msgs, gen); err != nil {
				if _, ok := errors.AsType[*ConversationError](err); !ok {
					t.Errorf("%s: %v", tmpl.File, err)
				}
			}
		}
	})
}
