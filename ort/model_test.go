package ort

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"h3infer/infer"
	"h3infer/internal/onnxgen"
	"h3infer/tokenize"
	"h3infer/workerconf"
)

func TestKVCacheMatchesRecompute(t *testing.T) {
	m := loadTestModel(t)
	tokens := m.Encode("The worker ")
	logits, kv, err := m.Prefill(tokens)
	if err != nil {
		t.Fatal(err)
	}
	b := m.newBatch()
	defer b.close()
	b.join(kv, len(tokens))
	for step := range 6 {
		want, _, err := m.Prefill(tokens)
		if err != nil {
			t.Fatal(err)
		}
		if d := maxAbsDiff(logits, want); d > 1e-3 {
			t.Fatalf("step %d: cached logits differ from recomputed ones by %g", step, d)
		}
		last := greedy(logits)
		tokens = append(tokens, last)
		if logits, err = b.step([]int{last}); err != nil {
			t.Fatal(err)
		}
		if b.n[0] != len(tokens) || b.cols != len(tokens) {
			t.Fatalf("cache holds %d tokens in %d columns, want %d", b.n[0], b.cols, len(tokens))
		}
	}
}

// greedy is the id of the largest logit, the lowest at a tie.
func greedy(logits []float32) int {
	best := 0
	for i, l := range logits {
		if l > logits[best] {
			best = i
		}
	}
	return best
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

func TestLoadModelErrors(t *testing.T) {
	needModel(t)
	copyModel := func(t *testing.T, edit func(t *testing.T, dir string)) string {
		dir := t.TempDir()
		for _, f := range []string{modelConfigFile, tokenizerFile, modelFile} {
			data, err := os.ReadFile(filepath.Join(demo.ModelDir(), f))
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
			_, err := LoadModel(copyModel(t, tc.edit), Options{})
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
	prompt := m.Encode(strings.Repeat("The gateway ", past/12+1))[:past]
	_, kv, err := m.Prefill(prompt)
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
	next := make([]int, rows)
	for r := range next {
		next[r] = 'e'
		bt.join(kv, past)
	}
	steps := 0
	for b.Loop() {
		if bt.widest() >= m.cfg.ContextLength-1 {
			b.StopTimer()
			for r := rows - 1; r >= 0; r-- {
				bt.leave(r)
			}
			for range rows {
				bt.join(kv, past)
			}
			b.StartTimer()
		}
		if _, err := bt.step(next); err != nil {
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
	if err := onnxgen.Write(dir, onnxgen.Options{ChatTemplate: tokenize.TemplateLlama3,
		SpecialTokens: []string{"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}}); err != nil {
		t.Fatal(err)
	}
	m, err := LoadModel(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	eot, _ := m.tok.TokenID("<|eot_id|>")
	header, _ := m.tok.TokenID("<|start_header_id|>")
	if !m.stopIDs[eot] || m.stopIDs[header] {
		t.Errorf("stop ids %v: want <|eot_id|> (%d) and not <|start_header_id|> (%d)", m.stopIDs, eot, header)
	}
}

// A model whose model.json names no chat template is served with its own
// Jinja template from tokenizer_config.json, whose eos_token ends turns;
// one whose eos_token the tokenizer lacks is refused, naming the file.
func TestJinjaTemplateFromTokenizerConfig(t *testing.T) {
	needModel(t)
	dir := t.TempDir()
	if err := onnxgen.Write(dir, onnxgen.Options{SpecialTokens: []string{"<|im_start|>", "<|im_end|>"}}); err != nil {
		t.Fatal(err)
	}
	// model.json as an exported model has it: no chat_template.
	path := filepath.Join(dir, modelConfigFile)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := json.Unmarshal(data, &cfg); err != nil {
		t.Fatal(err)
	}
	delete(cfg, "chat_template")
	if data, err = json.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	writeConfig := func(eos string) {
		t.Helper()
		tc, _ := json.Marshal(map[string]any{
			"chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
			"eos_token":     map[string]any{"__type": "AddedToken", "content": eos},
		})
		if err := os.WriteFile(filepath.Join(dir, tokenize.TokenizerConfigFile), tc, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	writeConfig("<|im_end|>")
	m, err := LoadModel(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	got, err := m.ChatTemplate().Render([]infer.ChatMessage{{Role: "user", Content: "Hi"}}, true)
	if want := "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"; err != nil || got != want {
		t.Errorf("rendered %q, %v; want %q", got, err, want)
	}
	end, _ := m.tok.TokenID("<|im_end|>")
	start, _ := m.tok.TokenID("<|im_start|>")
	if !m.stopIDs[end] || m.stopIDs[start] {
		t.Errorf("stop ids %v: want <|im_end|> (%d) and not <|im_start|> (%d)", m.stopIDs, end, start)
	}

	writeConfig("<|not_a_token|>")
	_, err = LoadModel(dir, Options{})
	if err == nil || !strings.Contains(err.Error(), tokenize.TokenizerConfigFile+`: bos_token or eos_token: "<|not_a_token|>"`) {
		t.Errorf("got %v, want the load refused for the eos_token", err)
	}
}

// generation_config.json's eos_token_id list ends generation too, as it
// does for the engines that read a model repository; an id past the
// vocabulary is refused, naming the file.
func TestGenerationConfigStops(t *testing.T) {
	needModel(t)
	dir := t.TempDir()
	if err := onnxgen.Write(dir, onnxgen.Options{SpecialTokens: []string{"<|eot|>"}}); err != nil {
		t.Fatal(err)
	}
	write := func(ids string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, workerconf.GenerationConfigFile), []byte(`{"eos_token_id": `+ids+`}`), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	m, err := LoadModel(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	eot, _ := m.tok.TokenID("<|eot|>")
	m.Close()
	if m.stopIDs[eot] {
		t.Fatalf("<|eot|> stops without a generation_config.json")
	}

	write(fmt.Sprintf("[%d, %d]", m.eos, eot))
	if m, err = LoadModel(dir, Options{}); err != nil {
		t.Fatal(err)
	}
	m.Close()
	if !m.stopIDs[eot] || !m.stopIDs[m.eos] {
		t.Errorf("stop ids %v: want <|eot|> (%d) and eos (%d)", m.stopIDs, eot, m.eos)
	}

	write("[1000000]")
	if _, err = LoadModel(dir, Options{}); err == nil || !strings.Contains(err.Error(), "generation_config.json: eos_token_id[0]: 1000000 is not a token") {
		t.Errorf("got %v, want the load refused for the eos_token_id", err)
	}
}
