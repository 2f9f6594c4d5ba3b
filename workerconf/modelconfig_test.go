package workerconf

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"h3infer/tokenize"
)

func TestParseModelConfig(t *testing.T) {
	tests := map[string]struct {
		in   string
		want []string // substrings of the error; none means valid
	}{
		"valid":          {`{"name":"demo","context_length":64,"eos_token":"<|endoftext|>","chat_template":"plain","stop_tokens":["<|endoftext|>"]}`, nil},
		"shape facts":    {`{"name":"d","context_length":8,"eos_token":"e","vocab_size":257,"num_layers":2,"num_heads":2,"head_dim":64}`, nil},
		"unknown key":    {`{"name":"d","context_length":8,"eos_token":"e","temperature":1}`, []string{`unknown field "temperature"`}},
		"every problem":  {`{"name":"","context_length":0,"eos_token":"","chat_template":"jinja","stop_tokens":[""]}`, []string{"name:", "context_length: must be > 0, got 0", "eos_token:", "chat_template:", "stop_tokens[0]:"}},
		"negative shape": {`{"name":"d","context_length":8,"eos_token":"e","num_heads":-1}`, []string{"num_heads: must be >= 0"}},
		"trailing data":  {`{"name":"d","context_length":8,"eos_token":"e"} {}`, []string{"trailing data"}},
		"wrong type":     {`{"name":"d","context_length":"8","eos_token":"e"}`, []string{"context_length"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := parseModelConfig([]byte(tc.in))
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("got %v, want no error", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("got no error, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func FuzzParseModelConfig(f *testing.F) {
	f.Add([]byte(`{"name":"demo","context_length":64,"eos_token":"<|endoftext|>","chat_template":"plain","stop_tokens":["<|endoftext|>"]}`))
	f.Add([]byte(`{"name":"d","context_length":8,"eos_token":"e","chat_template":"chatml"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := parseModelConfig(data)
		if err == nil && (c.Name == "" || c.ContextLength <= 0 || !knownTemplate(c.ChatTemplate)) {
			t.Fatalf("accepted invalid config %+v", c)
		}
	})
}

func knownTemplate(name string) bool {
	_, ok := tokenize.LookupTemplate(name)
	ok = ok || name == "" // the model's own template, else plain
	return ok
}

// TestLoadChatTemplatePrecedence: model.json's chat_template, when set,
// wins; else the model's own Jinja template; else plain.
func TestLoadChatTemplatePrecedence(t *testing.T) {
	const own = `{"chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}", "bos_token": "<s>", "eos_token": "</s>"}`
	tests := []struct {
		name      string
		named     string // model.json's chat_template
		config    string // tokenizer_config.json; "" writes none
		wantName  string
		wantJinja bool
		wantErr   string
	}{
		{name: "neither", wantName: tokenize.TemplatePlain},
		{name: "own template", config: own, wantJinja: true},
		{name: "named wins", named: tokenize.TemplateChatML, config: own, wantName: tokenize.TemplateChatML},
		{name: "named, own broken", named: tokenize.TemplateChatML, config: `{"chat_template": "{% if %}"}`, wantName: tokenize.TemplateChatML},
		{name: "own broken", config: `{"chat_template": "{% if %}"}`, wantErr: tokenize.TokenizerConfigFile + ": chat_template: "},
		{name: "config without template", config: `{"eos_token": "</s>"}`, wantName: tokenize.TemplatePlain},
		{name: "unknown name", named: "jinja", wantErr: `model.json: chat_template: must be one of plain, `},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.config != "" {
				if err := os.WriteFile(filepath.Join(dir, tokenize.TokenizerConfigFile), []byte(tc.config), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			c := ModelConfig{Name: "m", ContextLength: 8, EOSToken: "</s>", ChatTemplate: tc.named}
			tmpl, err := c.LoadChatTemplate(dir)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tmpl.Name != tc.wantName || (tmpl.File != "") != tc.wantJinja {
				t.Errorf("got template %q (file %q), want %q (jinja %v)", tmpl.Name, tmpl.File, tc.wantName, tc.wantJinja)
			}
		})
	}
}
