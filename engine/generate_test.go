package engine

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"h3infer/infer"
	"h3infer/internal/onnxgen"
	"h3infer/ort"
	"h3infer/tokenize"
)

func TestContextLength(t *testing.T) {
	needModel(t)
	dir := t.TempDir()
	opts := onnxgen.DefaultOptions()
	opts.Context = 16
	if err := onnxgen.Write(dir, opts); err != nil {
		t.Fatal(err)
	}
	m := loadModelDir(t, "small", dir, ort.Options{})

	_, _, err := Generate(context.Background(), m, &infer.Request{Prompt: strings.Repeat("a", 16)})
	re, ok := errors.AsType[*RequestError](err)
	if !ok || re.Code != infer.CodeContextLength {
		t.Fatalf("got %v, want a %s error", err, infer.CodeContextLength)
	}
	for _, want := range []string{"16 tokens", "context length of 16"} {
		if !strings.Contains(re.Message, want) {
			t.Errorf("message %q does not say %q", re.Message, want)
		}
	}

	// 15 tokens leave room for exactly one.
	_, done, err := Generate(context.Background(), m, &infer.Request{Prompt: strings.Repeat("a", 15)})
	if err != nil {
		t.Fatal(err)
	}
	if done.CompletionTokens != 1 || done.FinishReason != infer.FinishLength && done.FinishReason != infer.FinishStop {
		t.Errorf("done = %+v, want one completion token", done)
	}
	// Without max_tokens the context is the limit.
	_, done, err = Generate(context.Background(), m, &infer.Request{Prompt: "Th", Temperature: 0})
	if err != nil {
		t.Fatal(err)
	}
	if done.PromptTokens+done.CompletionTokens > 16 {
		t.Errorf("done = %+v runs past the context of 16", done)
	}
}

func TestGenerateMaxTokens(t *testing.T) {
	m := loadTestModel(t)
	text, done, err := Generate(context.Background(), m, &infer.Request{Prompt: "The ", MaxTokens: 7})
	if err != nil {
		t.Fatal(err)
	}
	if done.FinishReason != infer.FinishLength || done.CompletionTokens != 7 || done.PromptTokens != 4 {
		t.Errorf("done = %+v, want length after 7 tokens of a 4-token prompt", done)
	}
	if len(text) == 0 {
		t.Error("no text")
	}
}

// ignore_eos generates past the end token, up to max_tokens, and the text
// before the end token is what stopped there.
func TestGenerateIgnoreEOS(t *testing.T) {
	m := loadTestModel(t)
	s := infer.Request{Prompt: "The gateway", MaxTokens: 400}
	stopped, done, err := Generate(context.Background(), m, &s)
	if err != nil {
		t.Fatal(err)
	}
	if done.FinishReason != infer.FinishStop || done.CompletionTokens >= s.MaxTokens {
		t.Fatalf("greedy %q ended %+v; the test needs a prompt whose text ends with eos", stopped, done)
	}
	s.IgnoreEOS = true
	past, done, err := Generate(context.Background(), m, &s)
	if err != nil {
		t.Fatal(err)
	}
	if done.FinishReason != infer.FinishLength || done.CompletionTokens != s.MaxTokens {
		t.Errorf("with ignore_eos: ended %+v, want length after %d tokens", done, s.MaxTokens)
	}
	if !strings.HasPrefix(past, stopped) || len(past) <= len(stopped) || strings.Contains(past, "<|endoftext|>") {
		t.Errorf("with ignore_eos: %q, want more text after %q and no end token spelled out", past, stopped)
	}
}

// Every token carries its logprob entry, whose text is the model's piece:
// a token whose text the stream holds back, and the end token, which
// adds no text, included.
func TestGenerateLogprobs(t *testing.T) {
	m := loadTestModel(t)
	end := -1
	for id := range 257 {
		if _, isEnd := m.Piece(id); isEnd {
			end = id
		}
	}
	endPiece, _ := m.Piece(end)
	tests := map[string]infer.Request{
		// Greedy ends with the end token here (TestGenerateIgnoreEOS).
		"to the end token": {Prompt: "The gateway", MaxTokens: 400, Logprobs: true, TopLogprobs: 3},
		// A stop string that begins often and never ends holds text
		// back; the stream's flush at max_tokens lets it go.
		"held back": {Prompt: "The ", MaxTokens: 60, Stop: []string{"e zzz"}, Logprobs: true},
	}
	for name, s := range tests {
		t.Run(name, func(t *testing.T) {
			var tokens []infer.Token
			done, err := generate(context.Background(), m, &s, func(tok infer.Token) { tokens = append(tokens, tok) })
			if err != nil {
				t.Fatal(err)
			}
			var entries []infer.TokenLogprob
			var text, pieces strings.Builder
			heldBack := 0
			for i, tok := range tokens {
				if tok.Count != 1 || len(tok.Logprobs) != 1 {
					t.Fatalf("token %d: %+v, want one entry for its one token", i, tok)
				}
				if tok.Text == "" {
					heldBack++
				}
				text.WriteString(tok.Text)
				entries = append(entries, tok.Logprobs...)
			}
			checkLogprobs(t, name, &s, entries, done)
			for _, e := range entries {
				if e.Token != endPiece {
					pieces.WriteString(e.Token)
				}
			}
			if pieces.String() != text.String() {
				t.Errorf("entries spell %q, the text is %q", pieces.String(), text.String())
			}
			switch name {
			case "to the end token":
				if last := entries[len(entries)-1]; done.FinishReason != infer.FinishStop || last.Token != endPiece {
					t.Errorf("ended %+v with %+v, want the end token %q's entry last", done, last, endPiece)
				}
			case "held back":
				if heldBack == 0 {
					t.Errorf("no token's text was held back in %q", text.String())
				}
			}
		})
	}
}

func TestGenerateStopSequence(t *testing.T) {
	m := loadTestModel(t)
	full, _, err := Generate(context.Background(), m, &infer.Request{Prompt: "The ", MaxTokens: 60})
	if err != nil {
		t.Fatal(err)
	}
	if len(full) < 20 {
		t.Fatalf("greedy text %q too short to pick a stop from", full)
	}
	stop := full[10:13]
	want := full[:strings.Index(full, stop)]
	got, done, err := Generate(context.Background(), m, &infer.Request{Prompt: "The ", MaxTokens: 60, Stop: []string{"zzzz", stop}})
	if err != nil {
		t.Fatal(err)
	}
	if got != want || done.FinishReason != infer.FinishStop {
		t.Errorf("with stop %q got %q (%s), want %q (stop)", stop, got, done.FinishReason, want)
	}
}

func TestSeededSampling(t *testing.T) {
	m := loadTestModel(t)
	gen := func(seed uint64) string {
		t.Helper()
		text, _, err := Generate(context.Background(), m, &infer.Request{
			Prompt: "The ", MaxTokens: 40, Temperature: 1.5, TopP: 0.95, Seed: seed, HasSeed: true,
		})
		if err != nil {
			t.Fatal(err)
		}
		return text
	}
	a := gen(42)
	if b := gen(42); a != b {
		t.Errorf("seed 42 gave %q and then %q", a, b)
	}
	differs := false
	for seed := range uint64(5) {
		if gen(seed+100) != a {
			differs = true
		}
	}
	if !differs {
		t.Errorf("five other seeds all gave %q", a)
	}
}

func TestChatUsesTemplate(t *testing.T) {
	m := loadTestModel(t)
	chat, _, err := Generate(context.Background(), m, &infer.Request{
		Messages: []infer.ChatMessage{{Role: "user", Content: "The gateway"}}, MaxTokens: 20,
	})
	if err != nil {
		t.Fatal(err)
	}
	plain, _, err := Generate(context.Background(), m, &infer.Request{Prompt: "The gateway\n", MaxTokens: 20})
	if err != nil {
		t.Fatal(err)
	}
	if chat != plain {
		t.Errorf("chat gave %q, the plain prompt %q", chat, plain)
	}
}

func TestInvalidRequests(t *testing.T) {
	m := loadTestModel(t)
	tests := map[string]infer.Request{
		"negative temperature": {Prompt: "x", Temperature: -1},
		"top_p above 1":        {Prompt: "x", TopP: 1.5},
		"nan top_p":            {Prompt: "x", TopP: float32(math.NaN())},
		"prompt and messages":  {Prompt: "x", Messages: []infer.ChatMessage{{Role: "user", Content: "y"}}},
		"empty prompt":         {},
	}
	for name, s := range tests {
		t.Run(name, func(t *testing.T) {
			_, _, err := Generate(context.Background(), m, &s)
			if re, ok := errors.AsType[*RequestError](err); !ok || re.Code != infer.CodeInvalidRequest {
				t.Errorf("got %v, want an %s error", err, infer.CodeInvalidRequest)
			}
		})
	}
}

func TestInvalidSampling(t *testing.T) {
	m := loadTestModel(t)
	nan, inf := float32(math.NaN()), float32(math.Inf(1))
	bias := func(b ...infer.LogitBias) infer.Request { return infer.Request{Prompt: "x", LogitBias: b} }
	tests := map[string]struct {
		s    infer.Request
		says string
	}{
		"min_p above 1":             {infer.Request{Prompt: "x", MinP: 1.5}, "min_p must be in [0, 1], got 1.5"},
		"negative min_p":            {infer.Request{Prompt: "x", MinP: -0.1}, "min_p"},
		"nan min_p":                 {infer.Request{Prompt: "x", MinP: nan}, "min_p"},
		"infinite presence_penalty": {infer.Request{Prompt: "x", PresencePenalty: -inf}, "presence_penalty must be a finite number, got -Inf"},
		"nan frequency_penalty":     {infer.Request{Prompt: "x", FrequencyPenalty: nan}, "frequency_penalty"},
		"negative repetition":       {infer.Request{Prompt: "x", RepetitionPenalty: -1}, "repetition_penalty must be a finite number >= 0, got -1"},
		"infinite repetition":       {infer.Request{Prompt: "x", RepetitionPenalty: inf}, "repetition_penalty"},
		"nan repetition":            {infer.Request{Prompt: "x", RepetitionPenalty: nan}, "repetition_penalty"},
		"nan bias":                  {bias(infer.LogitBias{Token: 3, Bias: nan}), "logit_bias: token 3 has bias NaN"},
		"infinite bias":             {bias(infer.LogitBias{Token: 3, Bias: -inf}), "logit_bias: token 3 has bias -Inf"},
		"unsorted bias":             {bias(infer.LogitBias{Token: 7, Bias: 1}, infer.LogitBias{Token: 5, Bias: 1}), "logit_bias: tokens must be ascending and unique, got 5 after 7"},
		"duplicate bias":            {bias(infer.LogitBias{Token: 7, Bias: 1}, infer.LogitBias{Token: 7, Bias: 2}), "got 7 after 7"},
		// The demo model's vocabulary is 256 bytes and its end token.
		"bias past the vocabulary": {bias(infer.LogitBias{Token: 2, Bias: 1}, infer.LogitBias{Token: 70000, Bias: 1}),
			"logit_bias: token 70000 is not in model demo's vocabulary of 257 tokens"},
		"bias just past the vocabulary": {bias(infer.LogitBias{Token: 257, Bias: 1}), "token 257 is not in"},
		"top_logprobs over the bound": {infer.Request{Prompt: "x", Logprobs: true, TopLogprobs: 25},
			"top_logprobs: must be at most 20, got 25"},
		"top_logprobs without logprobs": {infer.Request{Prompt: "x", TopLogprobs: 3}, "top_logprobs: requires logprobs, got 3 without it"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, _, err := Generate(context.Background(), m, &tc.s)
			re, ok := errors.AsType[*RequestError](err)
			if !ok || re.Code != infer.CodeInvalidRequest || !strings.Contains(re.Message, tc.says) {
				t.Errorf("got %v, want an %s error saying %q", err, infer.CodeInvalidRequest, tc.says)
			}
		})
	}
	// The last token of the vocabulary, and the ranges' ends, are fine.
	for _, s := range []infer.Request{
		bias(infer.LogitBias{Token: 0, Bias: -1}, infer.LogitBias{Token: 256, Bias: 1}),
		{Prompt: "x", MinP: 1, RepetitionPenalty: 0, PresencePenalty: -2, FrequencyPenalty: 2},
		{Prompt: "x", Logprobs: true, TopLogprobs: infer.MaxTopLogprobs},
	} {
		if _, _, err := Generate(context.Background(), m, &s); err != nil {
			t.Errorf("%+v: %v", s, err)
		}
	}
}

// A model's own Jinja template formats chats, and a conversation it
// refuses with raise_exception is the request's fault, answered with the
// template's message.
func TestChatUsesJinjaTemplate(t *testing.T) {
	needModel(t)
	dir := t.TempDir()
	if err := onnxgen.Write(dir, onnxgen.DefaultOptions()); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "model.json")
	cfg, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	noTemplate := strings.Replace(string(cfg), `"chat_template": "plain",`, "", 1)
	if noTemplate == string(cfg) {
		t.Fatalf("model.json has no plain chat_template to remove: %s", cfg)
	}
	if err := os.WriteFile(path, []byte(noTemplate), 0o644); err != nil {
		t.Fatal(err)
	}
	const tmpl = `{"chat_template": "{% for m in messages %}{% if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role %}{{ raise_exception('roles must alternate') }}{% endif %}{{ m.content | upper }}\n{% endfor %}"}`
	if err := os.WriteFile(filepath.Join(dir, tokenize.TokenizerConfigFile), []byte(tmpl), 0o644); err != nil {
		t.Fatal(err)
	}
	m := loadModelDir(t, "jinja", dir, ort.Options{})

	chat, _, err := Generate(context.Background(), m, &infer.Request{
		Messages: []infer.ChatMessage{{Role: "user", Content: "the gateway"}}, MaxTokens: 10,
	})
	if err != nil {
		t.Fatal(err)
	}
	plain, _, err := Generate(context.Background(), m, &infer.Request{Prompt: "THE GATEWAY\n", MaxTokens: 10})
	if err != nil {
		t.Fatal(err)
	}
	if chat != plain {
		t.Errorf("chat gave %q, the prompt the template writes %q", chat, plain)
	}

	_, _, err = Generate(context.Background(), m, &infer.Request{
		Messages: []infer.ChatMessage{{Role: "user", Content: "a"}, {Role: "user", Content: "b"}},
	})
	if re, ok := errors.AsType[*RequestError](err); !ok || re.Code != infer.CodeInvalidRequest || re.Message != "roles must alternate" {
		t.Errorf("got %v, want an %s error with the template's message", err, infer.CodeInvalidRequest)
	}
}
