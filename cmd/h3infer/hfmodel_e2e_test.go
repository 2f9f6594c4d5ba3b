package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"h3infer/internal/onnxgen"
)

// refDir holds the reference implementations and real models' tokenizer
// files, installed by `make test` with npm ci.
const refDir = "../../tokenize/testdata/ref"

// refPrompt is what the reference makes of one request: the rendered chat
// text and its token ids, or the error the template raised.
type refPrompt struct {
	Text  string `json:"text"`
	IDs   []int  `json:"ids"`
	Error string `json:"error"`
}

// referencePrompts asks Hugging Face's own tokenizer and Jinja renderer
// (tokenize/testdata/ref/prompt.cjs) what model directory dir makes of
// each request.
func referencePrompts(t *testing.T, dir string, requests []map[string]any) []refPrompt {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatal("node is not installed; .ci/run installs it (Debian npm)")
	}
	if _, err := os.Stat(filepath.Join(refDir, "node_modules", ".package-lock.json")); err != nil {
		t.Fatalf("%s/node_modules is missing: run the tests through `make test`, which runs npm ci there", refDir)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	in, err := json.Marshal(map[string]any{"dir": abs, "requests": requests})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(node, "prompt.cjs")
	cmd.Dir = refDir
	cmd.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("prompt.cjs: %v\n%s", err, stderr.String())
	}
	var refs []refPrompt
	if err := json.Unmarshal(out, &refs); err != nil || len(refs) != len(requests) {
		t.Fatalf("prompt.cjs answered %d results for %d requests (%v): %s", len(refs), len(requests), err, out)
	}
	return refs
}

// TestHuggingFaceModelEndToEnd serves a model directory laid out as a
// real model repository ships it: gemma 3's SentencePiece-style
// tokenizer.json (byte fallback, no pre-tokenizer regex) and its Jinja
// chat template in tokenizer_config.json, beside random weights sized to
// its 262,145 ids. Through the real binary and a real worker, the prompt
// the model sees must be the one Hugging Face's tokenizer and Jinja
// renderer make of the same request, token for token; the template's own
// refusal must reach the client as a 400; streamed and whole answers must
// agree.
func TestHuggingFaceModelEndToEnd(t *testing.T) {
	src := filepath.Join(refDir, "node_modules", "@lenml", "tokenizer-gemma3", "models")
	repo := t.TempDir()
	const model = "gemma3-random"
	publishVersion(t, repo, model, "1", onnxgen.Options{Random: true, Layers: 1, Heads: 2, Hidden: 32, Context: 512, Seed: 3, Tokenizer: src})
	cfg := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, `{"model_repository": {"dir": %q}}`, repo), 0o600); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, "--config", cfg)
	c := s.h3Client(t)
	ctx := t.Context()

	chat := []map[string]any{
		{"messages": []map[string]string{
			{"role": "system", "content": "Answer in one line."},
			{"role": "user", "content": "Héllo wörld — 你好, 🤗 {{ not_a_variable }} {% raw %}\n\ttabs  and  spaces "},
		}},
		{"messages": []map[string]string{
			{"role": "user", "content": "First question?"},
			{"role": "assistant", "content": "  First answer.  "},
			{"role": "user", "content": "<start_of_turn> is text here, <bos> too"},
		}},
	}
	completion := []map[string]any{{"prompt": "Hello world, naïve café ☕"}, {"prompt": "  leading spaces\nand a newline"}}
	refused := []map[string]any{{"messages": []map[string]string{{"role": "user", "content": "a"}, {"role": "user", "content": "b"}}}}
	refs := referencePrompts(t, src, append(append(append([]map[string]any{}, chat...), completion...), refused...))

	type usage struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	}
	post := func(path string, body map[string]any) (int, []byte) {
		t.Helper()
		resp := postJSON(t, ctx, c, s.base+path, body)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, b
	}
	for i, req := range chat {
		t.Run(fmt.Sprintf("chat-%d", i), func(t *testing.T) {
			body := map[string]any{"model": model, "messages": req["messages"], "max_tokens": 16, "temperature": 1, "seed": 11}
			code, b := post("/v1/chat/completions", body)
			if code != http.StatusOK {
				t.Fatalf("status %d: %s", code, b)
			}
			var out struct {
				Choices []struct {
					Message struct{ Content string } `json:"message"`
				} `json:"choices"`
				Usage usage `json:"usage"`
			}
			if err := json.Unmarshal(b, &out); err != nil || len(out.Choices) != 1 {
				t.Fatalf("%v: %s", err, b)
			}
			if got, want := out.Usage.PromptTokens, len(refs[i].IDs); got != want {
				t.Errorf("prompt_tokens = %d, want %d: the reference's prompt is %q", got, want, refs[i].Text)
			}
			if out.Usage.CompletionTokens == 0 {
				t.Errorf("no completion tokens: %s", b)
			}

			body["stream"] = true
			streamed := readStream(t, postJSON(t, ctx, c, s.base+"/v1/chat/completions", body))
			if streamed.text != out.Choices[0].Message.Content {
				t.Errorf("streamed text differs from the whole answer with the same seed:\n got %q\nwant %q", streamed.text, out.Choices[0].Message.Content)
			}
		})
	}
	for i, req := range completion {
		ref := refs[len(chat)+i]
		code, b := post("/v1/completions", map[string]any{"model": model, "prompt": req["prompt"], "max_tokens": 4})
		if code != http.StatusOK {
			t.Fatalf("completion %d: status %d: %s", i, code, b)
		}
		var out struct{ Usage usage }
		if err := json.Unmarshal(b, &out); err != nil {
			t.Fatal(err)
		}
		if got, want := out.Usage.PromptTokens, len(ref.IDs); got != want {
			t.Errorf("completion %q: prompt_tokens = %d, want %d (the reference adds <bos>)", req["prompt"], got, want)
		}
	}

	// /tokenize gives a client the very ids the reference makes, so it
	// can count before it sends.
	for i, req := range append(append([]map[string]any{}, chat...), completion...) {
		body := map[string]any{"model": model}
		for k, v := range req {
			body[k] = v
		}
		code, b := post("/tokenize", body)
		var out struct {
			Count  int   `json:"count"`
			Tokens []int `json:"tokens"`
		}
		if err := json.Unmarshal(b, &out); code != http.StatusOK || err != nil {
			t.Fatalf("/tokenize %d: status %d, %v: %s", i, code, err, b)
		}
		if !slices.Equal(out.Tokens, refs[i].IDs) || out.Count != len(refs[i].IDs) {
			t.Errorf("/tokenize %d: %d tokens %v\nwant %d tokens %v (%q)", i, out.Count, out.Tokens, len(refs[i].IDs), refs[i].IDs, refs[i].Text)
		}
		code, b = post("/detokenize", map[string]any{"model": model, "tokens": out.Tokens})
		var text struct{ Prompt string }
		if err := json.Unmarshal(b, &text); code != http.StatusOK || err != nil || (req["prompt"] != nil && text.Prompt != "<bos>"+req["prompt"].(string)) {
			t.Errorf("/detokenize %d: status %d, %v: %s", i, code, err, b)
		}
	}

	ref := refs[len(refs)-1]
	if ref.Error == "" {
		t.Fatalf("the reference rendered a conversation gemma's template refuses: %q", ref.Text)
	}
	code, b := post("/v1/chat/completions", map[string]any{"model": model, "messages": refused[0]["messages"], "max_tokens": 4})
	if code != http.StatusBadRequest || !strings.Contains(string(b), ref.Error) {
		t.Errorf("refused conversation: status %d, %s; want 400 with the template's message %q", code, b, ref.Error)
	}
}
