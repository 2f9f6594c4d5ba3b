package main

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/quic-go/quic-go/http3"

	"h3infer/certs"
	"h3infer/gateway"
	"h3infer/infer"
	"h3infer/internal/onnxgen"
	"h3infer/ort"
	"h3infer/tokenize"
)

// writeChatVersion writes version ver of "demo" into repo with a
// tokenizer that merges (merges pairs learned from the demo corpus) and
// the ChatML template, so that token ids are not simply bytes.
func writeChatVersion(t *testing.T, repo, ver string, merges int) string {
	t.Helper()
	opts := onnxgen.DefaultOptions()
	opts.Merges = merges
	opts.SpecialTokens = []string{"<|im_start|>", "<|im_end|>"}
	opts.ChatTemplate = tokenize.TemplateChatML
	return publishVersion(t, repo, "demo", ver, opts)
}

type tokenizeAnswer struct {
	Count       int      `json:"count"`
	MaxModelLen int      `json:"max_model_len"`
	Tokens      []int    `json:"tokens"`
	TokenStrs   []string `json:"token_strs"`
	Prompt      string   `json:"prompt"`
	Error       *struct {
		Message string  `json:"message"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

// call POSTs body to s's path and decodes the answer, either shape.
func call(t *testing.T, c *http.Client, s *server, path string, body any, header ...string) (*http.Response, tokenizeAnswer) {
	t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, s.base+path, bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var a tokenizeAnswer
	if err := json.Unmarshal(raw, &a); err != nil {
		t.Fatalf("POST %s: %s: %v", path, raw, err)
	}
	return resp, a
}

// promptTokens is usage.prompt_tokens of a one-token completion of body
// on path: the number of tokens the worker fed the model.
func promptTokens(t *testing.T, c *http.Client, s *server, path string, body map[string]any, pin string) int {
	t.Helper()
	body["max_tokens"] = 1
	var h []string
	if pin != "" {
		h = []string{gateway.VersionHeader, pin}
	}
	b, _ := json.Marshal(body)
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.base+path, bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(h); i += 2 {
		req.Header.Set(h[i], h[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Usage struct {
			PromptTokens int `json:"prompt_tokens"`
		} `json:"usage"`
	}
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || json.Unmarshal(raw, &out) != nil {
		t.Fatalf("completion on %s: %s %s", path, resp.Status, raw)
	}
	return out.Usage.PromptTokens
}

// TestTokenizeCountsWhatTheModelSees runs /tokenize and /detokenize
// against a real gateway and real workers: the ids are those the worker's
// own code path gives, the count is the completion's usage.prompt_tokens
// for the same prompt and for the same conversation, detokenize gives the
// text back, a promoted version's tokenizer takes over, and each hostile
// request gets its status naming what is wrong.
func TestTokenizeCountsWhatTheModelSees(t *testing.T) {
	repo := t.TempDir()
	dir1 := writeChatVersion(t, repo, "1", 64)
	busy, _ := refusingUpstream(t, "solo")
	s := startServer(t, "--config", writeServeConfig(t, map[string]any{
		"model_repository": map[string]any{"dir": repo, "poll": "200ms"},
		"upstreams":        []map[string]any{{"name": "busy", "url": busy, "discover_interval": "200ms"}},
	}))
	waitFor(t, "the edge to list the upstream's model", func() bool { return listsModel(t, s, "solo") })
	c := s.h3Client(t)

	// What the worker computes for the prompt, through its own code path.
	if err := ort.InitRuntime(ortLib(t)); err != nil {
		t.Fatal(err)
	}
	m, err := ort.LoadModel(dir1, ort.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	prompt := "The gateway speaks <|im_end|> HTTP/3 to the edge, and the edge answers."
	msgs := []infer.ChatMessage{{Role: "system", Content: "Be brief."}, {Role: "user", Content: prompt}}
	rendered, err := m.ChatTemplate().Render(msgs, true)
	if err != nil {
		t.Fatal(err)
	}
	wantPrompt, wantChat := m.Encode(prompt), m.Encode(rendered)
	if len(wantPrompt) >= len(prompt) {
		t.Fatalf("the test tokenizer merges nothing (%d ids for %d bytes)", len(wantPrompt), len(prompt))
	}

	t.Run("prompt", func(t *testing.T) {
		resp, a := call(t, c, s, "/tokenize", map[string]any{"model": "demo", "prompt": prompt, "return_token_strs": true})
		if resp.StatusCode != http.StatusOK || !slices.Equal(a.Tokens, wantPrompt) || a.Count != len(wantPrompt) || a.MaxModelLen != onnxgen.DefaultContext {
			t.Fatalf("%s: count %d, max_model_len %d, tokens %v; want %d tokens %v, %d", resp.Status, a.Count, a.MaxModelLen, a.Tokens, len(wantPrompt), wantPrompt, onnxgen.DefaultContext)
		}
		if resp.Header.Get(gateway.VersionHeader) != "1" {
			t.Errorf("%s: %q, want 1", gateway.VersionHeader, resp.Header.Get(gateway.VersionHeader))
		}
		if len(a.TokenStrs) != a.Count || !slices.Contains(a.TokenStrs, "<|im_end|>") {
			t.Errorf("token_strs %q", a.TokenStrs)
		}
		if got := promptTokens(t, c, s, "/v1/completions", map[string]any{"model": "demo", "prompt": prompt}, ""); got != a.Count {
			t.Errorf("the completion's usage.prompt_tokens is %d, /tokenize counted %d", got, a.Count)
		}
		_, back := call(t, c, s, "/detokenize", map[string]any{"model": "demo", "tokens": a.Tokens})
		if back.Prompt != prompt {
			t.Errorf("detokenize gave %q, want %q", back.Prompt, prompt)
		}
	})
	t.Run("chat", func(t *testing.T) {
		wire := []map[string]string{{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}}
		resp, a := call(t, c, s, "/tokenize", map[string]any{"model": "demo", "messages": wire})
		if resp.StatusCode != http.StatusOK || !slices.Equal(a.Tokens, wantChat) || a.TokenStrs != nil {
			t.Fatalf("%s: tokens %v token_strs %v; want %v and no strings", resp.Status, a.Tokens, a.TokenStrs, wantChat)
		}
		if got := promptTokens(t, c, s, "/v1/chat/completions", map[string]any{"model": "demo", "messages": wire}, ""); got != a.Count {
			t.Errorf("the chat completion's usage.prompt_tokens is %d, /tokenize counted %d", got, a.Count)
		}
		_, back := call(t, c, s, "/detokenize", map[string]any{"model": "demo", "tokens": a.Tokens})
		if back.Prompt != rendered {
			t.Errorf("detokenize gave %q, want the rendered chat %q", back.Prompt, rendered)
		}
	})
	t.Run("longer than the context", func(t *testing.T) {
		long := strings.Repeat("edge ", onnxgen.DefaultContext)
		resp, a := call(t, c, s, "/tokenize", map[string]any{"model": "demo", "prompt": long})
		if resp.StatusCode != http.StatusOK || a.Count <= a.MaxModelLen {
			t.Errorf("%s: count %d, max_model_len %d; want the whole count, past the context", resp.Status, a.Count, a.MaxModelLen)
		}
	})

	for _, tc := range []struct {
		name, path string
		body       any
		status     int
		param      string
		says       string
	}{
		{"unknown model", "/tokenize", map[string]any{"model": "nope", "prompt": "x"}, 404, "model", "does not exist"},
		{"upstream model", "/tokenize", map[string]any{"model": "solo", "prompt": "x"}, 400, "model", `model "solo" is served by an upstream; /tokenize and /detokenize are not available for it`},
		{"upstream model detokenize", "/detokenize", map[string]any{"model": "solo", "tokens": []int{1}}, 400, "model", "served by an upstream"},
		{"unknown field", "/tokenize", map[string]any{"model": "demo", "prompt": "x", "truncate_prompt_tokens": 3}, 400, "truncate_prompt_tokens", "unknown parameter"},
		{"both prompt and messages", "/tokenize", map[string]any{"model": "demo", "prompt": "x", "messages": []map[string]string{{"role": "user", "content": "y"}}}, 400, "messages", "not both"},
		{"neither", "/tokenize", map[string]any{"model": "demo"}, 400, "prompt", "required"},
		{"wrong type", "/tokenize", map[string]any{"model": "demo", "prompt": []int{1, 2}}, 400, "prompt", "expected string"},
		{"id past the vocabulary", "/detokenize", map[string]any{"model": "demo", "tokens": []int{5, 1 << 20}}, 400, "tokens", "tokens[1]: 1048576 is not a token id"},
		{"negative id", "/detokenize", map[string]any{"model": "demo", "tokens": []int{-1}}, 400, "tokens", "tokens[0]: -1 is not a token id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, a := call(t, c, s, tc.path, tc.body)
			if resp.StatusCode != tc.status || a.Error == nil || a.Error.Param == nil || *a.Error.Param != tc.param || !strings.Contains(a.Error.Message, tc.says) {
				t.Errorf("%s %+v; want %d naming %q, saying %q", resp.Status, a.Error, tc.status, tc.param, tc.says)
			}
		})
	}
	t.Run("body past the limit", func(t *testing.T) {
		resp, a := call(t, c, s, "/tokenize", map[string]any{"model": "demo", "prompt": strings.Repeat("x", gateway.DefaultMaxBodyBytes)})
		if resp.StatusCode != http.StatusRequestEntityTooLarge || a.Error == nil {
			t.Errorf("%s %+v; want 413", resp.Status, a.Error)
		}
	})
	t.Run("auth required", func(t *testing.T) {
		pool, err := certs.LoadPool(s.caFile)
		if err != nil {
			t.Fatal(err)
		}
		tr := &http3.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
		defer tr.Close()
		for _, path := range []string{"/tokenize", "/detokenize"} {
			resp, a := call(t, &http.Client{Transport: tr}, s, path, map[string]any{"model": "demo", "prompt": "x"})
			if resp.StatusCode != http.StatusUnauthorized || a.Error == nil || resp.Header.Get("WWW-Authenticate") == "" {
				t.Errorf("%s without a token: %s %+v", path, resp.Status, a.Error)
			}
		}
	})

	// Version 2's tokenizer merges nothing: after the swap the same
	// prompt is one token per byte, unless version 1 is pinned.
	writeChatVersion(t, repo, "2", 0)
	waitFor(t, "version 2 to take over", func() bool {
		resp, _ := call(t, c, s, "/tokenize", map[string]any{"model": "demo", "prompt": "x"})
		return resp.Header.Get(gateway.VersionHeader) == "2"
	})
	_, a := call(t, c, s, "/tokenize", map[string]any{"model": "demo", "prompt": "The gateway"})
	if a.Count != len("The gateway") {
		t.Errorf("version 2 counts %d tokens for %d bytes; want one per byte", a.Count, len("The gateway"))
	}
	if got := promptTokens(t, c, s, "/v1/completions", map[string]any{"model": "demo", "prompt": "The gateway"}, ""); got != a.Count {
		t.Errorf("after the swap the completion saw %d tokens, /tokenize counted %d", got, a.Count)
	}
	resp, pinned := call(t, c, s, "/tokenize", map[string]any{"model": "demo", "prompt": prompt}, gateway.VersionHeader, "1")
	if resp.StatusCode != http.StatusOK || !slices.Equal(pinned.Tokens, wantPrompt) {
		t.Errorf("pinned to version 1 after the swap: %s %v, want %v", resp.Status, pinned.Tokens, wantPrompt)
	}

	metrics := scrape(t, s)
	for _, route := range []string{"/tokenize", "/detokenize"} {
		if !strings.Contains(metrics, fmt.Sprintf(`route=%q`, route)) {
			t.Errorf("/metrics has no requests labelled route=%q", route)
		}
	}
}
