package backend

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"h3infer/infer"
	"h3infer/internal/onnxgen"
)

func TestKVCacheMatchesRecompute(t *testing.T) {
	m := loadTestModel(t)
	tokens := m.tok.encode("The worker ")
	logits, kv, err := m.prefill(tokens)
	if err != nil {
		t.Fatal(err)
	}
	g := &generation{m: m, n: len(tokens), row: -1}
	b := m.newBatch()
	defer b.close()
	b.join(g, kv)
	for step := range 6 {
		want, _, err := m.prefill(tokens)
		if err != nil {
			t.Fatal(err)
		}
		if d := maxAbsDiff(logits, want); d > 1e-3 {
			t.Fatalf("step %d: cached logits differ from recomputed ones by %g", step, d)
		}
		g.last = argmax(logits)
		tokens = append(tokens, g.last)
		if err := b.step(); err != nil {
			t.Fatal(err)
		}
		logits = g.logits
		if g.n != len(tokens) || b.cols != len(tokens) {
			t.Fatalf("cache holds %d tokens in %d columns, want %d", g.n, b.cols, len(tokens))
		}
	}
}

func maxAbsDiff(a, b []float32) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	d := 0.0
	for i := range a {
		d = max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

func TestContextLength(t *testing.T) {
	needModel(t)
	dir := t.TempDir()
	opts := onnxgen.DefaultOptions()
	opts.Context = 16
	if err := onnxgen.Write(dir, opts); err != nil {
		t.Fatal(err)
	}
	m, err := LoadModel(dir, ModelOptions{Name: "small"})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()

	_, _, err = m.Generate(context.Background(), &infer.Request{Prompt: strings.Repeat("a", 16)})
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
	_, done, err := m.Generate(context.Background(), &infer.Request{Prompt: strings.Repeat("a", 15)})
	if err != nil {
		t.Fatal(err)
	}
	if done.CompletionTokens != 1 || done.FinishReason != infer.FinishLength && done.FinishReason != infer.FinishStop {
		t.Errorf("done = %+v, want one completion token", done)
	}
	// Without max_tokens the context is the limit.
	_, done, err = m.Generate(context.Background(), &infer.Request{Prompt: "Th", Temperature: 0})
	if err != nil {
		t.Fatal(err)
	}
	if done.PromptTokens+done.CompletionTokens > 16 {
		t.Errorf("done = %+v runs past the context of 16", done)
	}
}

func TestGenerateMaxTokens(t *testing.T) {
	m := loadTestModel(t)
	text, done, err := m.Generate(context.Background(), &infer.Request{Prompt: "The ", MaxTokens: 7})
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
	stopped, done, err := m.Generate(context.Background(), &s)
	if err != nil {
		t.Fatal(err)
	}
	if done.FinishReason != infer.FinishStop || done.CompletionTokens >= s.MaxTokens {
		t.Fatalf("greedy %q ended %+v; the test needs a prompt whose text ends with eos", stopped, done)
	}
	s.IgnoreEOS = true
	past, done, err := m.Generate(context.Background(), &s)
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

func TestGenerateStopSequence(t *testing.T) {
	m := loadTestModel(t)
	full, _, err := m.Generate(context.Background(), &infer.Request{Prompt: "The ", MaxTokens: 60})
	if err != nil {
		t.Fatal(err)
	}
	if len(full) < 20 {
		t.Fatalf("greedy text %q too short to pick a stop from", full)
	}
	stop := full[10:13]
	want := full[:strings.Index(full, stop)]
	got, done, err := m.Generate(context.Background(), &infer.Request{Prompt: "The ", MaxTokens: 60, Stop: []string{"zzzz", stop}})
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
		text, _, err := m.Generate(context.Background(), &infer.Request{
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
	chat, _, err := m.Generate(context.Background(), &infer.Request{
		Messages: []infer.ChatMessage{{Role: "user", Content: "The gateway"}}, MaxTokens: 20,
	})
	if err != nil {
		t.Fatal(err)
	}
	plain, _, err := m.Generate(context.Background(), &infer.Request{Prompt: "The gateway\n", MaxTokens: 20})
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
			_, _, err := m.Generate(context.Background(), &s)
			if re, ok := errors.AsType[*RequestError](err); !ok || re.Code != infer.CodeInvalidRequest {
				t.Errorf("got %v, want an %s error", err, infer.CodeInvalidRequest)
			}
		})
	}
}

func TestLoadModelErrors(t *testing.T) {
	needModel(t)
	copyModel := func(t *testing.T, edit func(t *testing.T, dir string)) string {
		dir := t.TempDir()
		for _, f := range []string{modelConfigFile, tokenizerFile, modelFile} {
			data, err := os.ReadFile(filepath.Join(testModelDir, f))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, f), data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		edit(t, dir)
		return dir
	}
	editConfig := func(from, to string) func(*testing.T, string) {
		return func(t *testing.T, dir string) {
			p := filepath.Join(dir, modelConfigFile)
			data, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			edited := strings.Replace(string(data), from, to, 1)
			if edited == string(data) {
				t.Fatalf("%q not found in %s", from, data)
			}
			if err := os.WriteFile(p, []byte(edited), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	tests := map[string]struct {
		edit func(*testing.T, string)
		want string
	}{
		"unknown key":      {editConfig(`"name"`, `"colour": "red", "name"`), `unknown field "colour"`},
		"unknown eos":      {editConfig(`"eos_token": "`, `"eos_token": "nope`), "eos_token"},
		"shape mismatch":   {editConfig(`"num_layers": 2`, `"num_layers": 3`), "num_layers: 3"},
		"missing onnx":     {func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, modelFile)) }, modelFile},
		"bad tokenizer":    {func(t *testing.T, dir string) { os.WriteFile(filepath.Join(dir, tokenizerFile), []byte("{}"), 0o644) }, "model.type"},
		"missing context":  {editConfig(`"context_length"`, `"context_len"`), "context_len"},
		"unknown kv_cache": {editConfig(`"name"`, `"kv_cache": "paged", "name"`), `kv_cache: must be "concat" or "append", got "paged"`},
		// The demo tokenizer has no <|im_start|>: chatml prompts would
		// reach the model spelled out, so the load is refused.
		"template markers": {editConfig(`"chat_template": "plain"`, `"chat_template": "chatml"`), `"<|im_start|>", which is not among the added tokens`},
		"unknown template": {editConfig(`"chat_template": "plain"`, `"chat_template": "jinja"`), "chat_template: must be one of plain, chatml, llama3"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := LoadModel(copyModel(t, tc.edit), ModelOptions{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
}

// BenchmarkDecodeStep runs decode steps of batches of 1 to 64 rows whose
// caches hold about 512 tokens, and reports the cost per generated token
// beside the cost per step, so one run shows what batching buys.
func BenchmarkDecodeStep(b *testing.B) {
	b.Run("model=demo", func(b *testing.B) { benchmarkDecodeStep(b, loadTestModel(b), 512) })
	for _, layout := range []string{onnxgen.KVCacheConcat, onnxgen.KVCacheAppend} {
		b.Run("model=h512l4/kv_cache="+layout, func(b *testing.B) {
			m := loadRandomModel(b, onnxgen.Options{Layers: 4, Heads: 8, Hidden: 512, Seed: 1, KVCache: layout})
			benchmarkDecodeStep(b, m, 100)
		})
	}
}

func benchmarkDecodeStep(b *testing.B, m *Model, past int) {
	prompt := m.tok.encode(strings.Repeat("The gateway ", past/12+1))[:past]
	_, kv, err := m.prefill(prompt)
	if err != nil {
		b.Fatal(err)
	}
	for _, rows := range []int{1, 8, 32, 64} {
		b.Run(fmt.Sprintf("rows=%d", rows), func(b *testing.B) {
			b.ReportMetric(stepLoop(b, m, rows, past, kv), "ns/token")
		})
	}
}

// stepLoop runs decode steps of a batch of rows sequences whose caches
// hold past tokens, starting over whenever the context fills, and returns
// the time per generated token in nanoseconds.
func stepLoop(b *testing.B, m *Model, rows, past int, kv [][]byte) float64 {
	bt := m.newBatch()
	defer bt.close()
	gens := make([]*generation, rows)
	for i := range gens {
		gens[i] = &generation{m: m, n: past, row: -1, last: 'e'}
		bt.join(gens[i], kv)
	}
	steps := 0
	for b.Loop() {
		if bt.widest() >= m.cfg.ContextLength-1 {
			b.StopTimer()
			for _, g := range gens {
				bt.leave(g)
				g.n = past
				bt.join(g, kv)
			}
			b.StartTimer()
		}
		if err := bt.step(); err != nil {
			b.Fatal(err)
		}
		steps++
	}
	return float64(b.Elapsed().Nanoseconds()) / float64(steps*rows)
}

// The token that ends a chat template's turns stops generation, as eos does.
func TestTemplateEndOfTurnStops(t *testing.T) {
	needModel(t)
	dir := t.TempDir()
	if err := onnxgen.Write(dir, onnxgen.Options{ChatTemplate: TemplateLlama3,
		SpecialTokens: []string{"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}}); err != nil {
		t.Fatal(err)
	}
	m, err := LoadModel(dir, ModelOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	eot, _ := m.tok.tokenID("<|eot_id|>")
	header, _ := m.tok.tokenID("<|start_header_id|>")
	if !m.stopIDs[eot] || m.stopIDs[header] {
		t.Errorf("stop ids %v: want <|eot_id|> (%d) and not <|start_header_id|> (%d)", m.stopIDs, eot, header)
	}
}
