package onnxgen

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode"

	ort "github.com/yalue/onnxruntime_go"
)

// writeDemo writes the default demo model into a fresh directory.
func writeDemo(tb testing.TB) string {
	tb.Helper()
	dir := tb.TempDir()
	if err := Write(dir, DefaultOptions()); err != nil {
		tb.Fatalf("Write: %v", err)
	}
	return dir
}

func TestDemoCachedGreedyMatchesFullRecompute(t *testing.T) {
	r := newRunner(t, writeDemo(t))
	for _, prompt := range []string{"The gateway", "Batching keeps", "zq"} {
		t.Run(prompt, func(t *testing.T) {
			cached := r.greedyCached(t, bytesToIDs(prompt), 64)
			full := r.greedyFull(t, bytesToIDs(prompt), 64)
			if !slicesEqual(cached, full) {
				t.Errorf("cached greedy %q\nfull recompute %q", idsToText(cached), idsToText(full))
			}
		})
	}
}

func TestDemoBatchWithPaddingMatchesSingle(t *testing.T) {
	r := newRunner(t, writeDemo(t))
	prompts := []string{"The gateway", "Streaming is the whole"}
	const steps = 12
	// Reference: each prompt alone, logits of the prompt's last token and of
	// every decode step.
	alone := make([][][]float32, len(prompts))
	for i, p := range prompts {
		ids := bytesToIDs(p)
		c := r.emptyCache(t, 1)
		logits, next := r.step(t, [][]int64{ids}, [][]int64{maskOnes(len(ids))}, [][]int64{iota64(0, len(ids))}, c)
		c.destroy()
		c = next
		alone[i] = append(alone[i], logits[0][len(ids)-1])
		for s := 0; s < steps; s++ {
			n := len(ids) + s + 1
			logits, next = r.step(t, [][]int64{{argmax32(alone[i][s])}}, [][]int64{maskOnes(n)}, [][]int64{{int64(n - 1)}}, c)
			c.destroy()
			c = next
			alone[i] = append(alone[i], logits[0][0])
		}
		c.destroy()
	}

	for _, side := range []string{"left", "right"} {
		t.Run(side, func(t *testing.T) {
			width := 0
			for _, p := range prompts {
				width = max(width, len(p))
			}
			// Padded rows. Padding positions get id 0 and position 0; the mask
			// hides them. Right-padded rows keep their holes in the mask as
			// they decode.
			ids := make([][]int64, len(prompts))
			mask := make([][]int64, len(prompts))
			pos := make([][]int64, len(prompts))
			lastIdx := make([]int, len(prompts))
			for i, p := range prompts {
				pad := width - len(p)
				ids[i] = make([]int64, width)
				mask[i] = make([]int64, width)
				pos[i] = make([]int64, width)
				start := 0
				if side == "left" {
					start = pad
				}
				for j := 0; j < len(p); j++ {
					ids[i][start+j] = int64(p[j])
					mask[i][start+j] = 1
					pos[i][start+j] = int64(j)
				}
				lastIdx[i] = start + len(p) - 1
			}
			c := r.emptyCache(t, len(prompts))
			logits, next := r.step(t, ids, mask, pos, c)
			c.destroy()
			c = next
			defer func() { c.destroy() }()
			for s := 0; s <= steps; s++ {
				tokens := make([][]int64, len(prompts))
				stepPos := make([][]int64, len(prompts))
				for i, p := range prompts {
					var got []float32
					if s == 0 {
						got = logits[i][lastIdx[i]]
					} else {
						got = logits[i][0]
					}
					if d := maxAbsDiff(got, alone[i][s]); d > 1e-3 {
						t.Fatalf("row %d step %d: logits differ from the unbatched run by %g", i, s, d)
					}
					tokens[i] = []int64{argmax32(got)}
					stepPos[i] = []int64{int64(len(p) + s)}
					mask[i] = append(mask[i], 1)
				}
				if s == steps {
					break
				}
				logits, next = r.step(t, tokens, mask, stepPos, c)
				c.destroy()
				c = next
			}
		})
	}
}

func TestDemoGreedyIsReadable(t *testing.T) {
	r := newRunner(t, writeDemo(t))
	known := map[string]bool{}
	for _, w := range strings.Fields(corpus) {
		known[strings.TrimFunc(w, unicode.IsPunct)] = true
	}
	for _, prompt := range []string{"The gateway", "A token", "Hello there, my friend. What is"} {
		out := idsToText(r.greedyCached(t, bytesToIDs(prompt), 160))
		t.Logf("%q -> %q", prompt, out)
		text, _, _ := strings.Cut(out, EndOfText)
		text, _, _ = strings.Cut(text, "<|256|>")
		letters := 0
		for _, c := range text {
			if unicode.IsLetter(c) || c == ' ' {
				letters++
			}
		}
		if frac := float64(letters) / float64(len(text)); frac < 0.9 {
			t.Errorf("%q: only %.0f%% letters and spaces in %q", prompt, 100*frac, text)
		}
		// The first word may finish the prompt's last word.
		words := strings.Fields(text)
		if len(words) > 0 {
			words = words[1:]
		}
		hits := 0
		for _, w := range words {
			if known[strings.TrimFunc(w, unicode.IsPunct)] {
				hits++
			}
		}
		if len(words) < 10 || float64(hits) < 0.9*float64(len(words)) {
			t.Errorf("%q: %d of %d generated words are corpus words: %q", prompt, hits, len(words), text)
		}
	}
}

func TestDemoEndsWithEndOfText(t *testing.T) {
	r := newRunner(t, writeDemo(t))
	out := r.greedyCached(t, bytesToIDs("at the edge of the network where the"), 13)
	if got, want := idsToText(out), " people are.<|256|>"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestRandomModelsRun(t *testing.T) {
	for name, opts := range map[string]Options{
		"tiny":        {Random: true, Layers: 1, Heads: 1, Hidden: 16, Context: 64, Seed: 1},
		"default":     {Random: true, Seed: 2},
		"wide-vocab":  {Random: true, Layers: 3, Heads: 4, Hidden: 64, Context: 512, Vocab: 1000, Seed: 3},
		"eight-heads": {Random: true, Layers: 4, Heads: 8, Hidden: 256, Context: 1024, Seed: 4},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if err := Write(dir, opts); err != nil {
				t.Fatalf("Write: %v", err)
			}
			r := newRunner(t, dir)
			o := opts.withDefaults()
			if r.cfg.NumLayers != o.Layers || r.cfg.VocabSize != o.Vocab || r.cfg.HeadDim != o.Hidden/o.Heads || r.cfg.ContextLength != o.Context {
				t.Fatalf("model.json %+v does not describe %+v", r.cfg, o)
			}
			prompt := bytesToIDs("random weights")
			cached := r.greedyCached(t, prompt, 6)
			full := r.greedyFull(t, prompt, 6)
			if !slicesEqual(cached, full) {
				t.Errorf("cached greedy %v, full recompute %v", cached, full)
			}
			c := r.emptyCache(t, 1)
			logits, next := r.step(t, [][]int64{prompt}, [][]int64{maskOnes(len(prompt))}, [][]int64{iota64(0, len(prompt))}, c)
			c.destroy()
			next.destroy()
			for _, v := range logits[0][len(prompt)-1] {
				if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
					t.Fatalf("non-finite logit %v", v)
				}
			}
		})
	}
}

func TestRandomModelsAreDeterministic(t *testing.T) {
	read := func(opts Options) []byte {
		dir := t.TempDir()
		if err := Write(dir, opts); err != nil {
			t.Fatalf("Write: %v", err)
		}
		b, err := os.ReadFile(filepath.Join(dir, ModelFile))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	opts := Options{Random: true, Hidden: 32, Context: 32, Seed: 7}
	a, b := read(opts), read(opts)
	if !bytes.Equal(a, b) {
		t.Error("same seed gave different model files")
	}
	opts.Seed = 8
	if bytes.Equal(a, read(opts)) {
		t.Error("different seeds gave the same model file")
	}
}

func TestOptionsValidation(t *testing.T) {
	for name, tc := range map[string]struct {
		opts Options
		want []string // substrings of the error; none means valid
	}{
		"defaults":                    {opts: Options{}},
		"demo context":                {opts: Options{Context: 1024}},
		"demo shape fixed":            {opts: Options{Layers: 3, Hidden: 64}, want: []string{"layers: the demo model has 2", "hidden: the demo model has 128"}},
		"odd head dim":                {opts: Options{Random: true, Heads: 2, Hidden: 30}, want: []string{"even head dimension"}},
		"context small":               {opts: Options{Context: 8}, want: []string{"context: must be in [16, 65536], got 8"}},
		"negative layers":             {opts: Options{Random: true, Layers: -1}, want: []string{"layers: must be in [1, 64], got -1"}},
		"vocab small":                 {opts: Options{Random: true, Vocab: 100}, want: []string{"vocab: must be in [257"}},
		"too big":                     {opts: Options{Random: true, Layers: 64, Hidden: 8192, Heads: 64}, want: []string{"MiB limit"}},
		"own tokenizer, demo weights": {opts: Options{Tokenizer: "dir"}, want: []string{"tokenizer: needs Random"}},
		"own tokenizer and merges":    {opts: Options{Random: true, Tokenizer: "dir", Merges: 4}, want: []string{"excludes merges"}},
	} {
		t.Run(name, func(t *testing.T) {
			err := tc.opts.withDefaults().validate()
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
	if err := Write(t.TempDir(), Options{Context: 1}); err == nil {
		t.Error("Write accepted an invalid context")
	}
}

func TestConfigAndTokenizerFiles(t *testing.T) {
	dir := writeDemo(t)
	raw, err := os.ReadFile(filepath.Join(dir, ConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]any{
		"name": "demo", "context_length": float64(DefaultContext), "eos_token": EndOfText,
		"chat_template": "plain", "vocab_size": float64(257), "num_layers": float64(2),
		"num_heads": float64(2), "head_dim": float64(64),
	} {
		if cfg[key] != want {
			t.Errorf("model.json %s = %v, want %v", key, cfg[key], want)
		}
	}
	if stops, _ := cfg["stop_tokens"].([]any); len(stops) != 1 || stops[0] != EndOfText {
		t.Errorf("model.json stop_tokens = %v", cfg["stop_tokens"])
	}

	raw, err = os.ReadFile(filepath.Join(dir, TokenizerFile))
	if err != nil {
		t.Fatal(err)
	}
	var tok struct {
		AddedTokens []addedToken          `json:"added_tokens"`
		PreTok      struct{ Type string } `json:"pre_tokenizer"`
		Decoder     struct{ Type string } `json:"decoder"`
		Model       struct {
			Type   string         `json:"type"`
			Vocab  map[string]int `json:"vocab"`
			Merges []string       `json:"merges"`
		} `json:"model"`
	}
	if err := json.Unmarshal(raw, &tok); err != nil {
		t.Fatal(err)
	}
	if tok.Model.Type != "BPE" || tok.PreTok.Type != "ByteLevel" || tok.Decoder.Type != "ByteLevel" || len(tok.Model.Merges) != 0 {
		t.Errorf("unexpected tokenizer layout: model %q pre %q decoder %q merges %d", tok.Model.Type, tok.PreTok.Type, tok.Decoder.Type, len(tok.Model.Merges))
	}
	if len(tok.Model.Vocab) != 257 {
		t.Fatalf("vocab has %d entries, want 257", len(tok.Model.Vocab))
	}
	// Spot checks against the well-known byte-level spellings.
	for s, id := range map[string]int{"A": 'A', "Ġ": ' ', "Ċ": '\n', "Ā": 0, "ÿ": 255, "ł": 0xA0, "Ń": 0xAD, EndOfText: 256} {
		if tok.Model.Vocab[s] != id {
			t.Errorf("vocab[%q] = %d, want %d", s, tok.Model.Vocab[s], id)
		}
	}
	if len(tok.AddedTokens) != 1 || tok.AddedTokens[0] != (addedToken{ID: 256, Content: EndOfText, Special: true}) {
		t.Errorf("added tokens %+v", tok.AddedTokens)
	}
}

func slicesEqual(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func BenchmarkDemoDecodeStep(b *testing.B) {
	r := newRunner(b, writeDemo(b))
	for _, ctx := range []int{512, 2048} {
		b.Run(fmt.Sprintf("context=%d", ctx), func(b *testing.B) {
			benchmarkDecodeStep(b, r, ctx)
		})
	}
}

// benchmarkDecodeStep times one single-token step whose cache holds ctx-1
// positions of corpus text. Outputs are preallocated, as a serving loop
// would do, so the figure is ONNX Runtime's and not the Go binding's copy of
// auto-allocated outputs.
func benchmarkDecodeStep(b *testing.B, r *runner, ctx int) {
	text := strings.Repeat(corpus, ctx/len(corpus)+1)
	ids := bytesToIDs(text[:ctx-1])
	c := r.emptyCache(b, 1)
	_, past := r.step(b, [][]int64{ids}, [][]int64{maskOnes(len(ids))}, [][]int64{iota64(0, len(ids))}, c)
	c.destroy()
	defer past.destroy()
	in := []ort.Value{int64Input(b, [][]int64{{'e'}}), int64Input(b, [][]int64{maskOnes(ctx)}), int64Input(b, [][]int64{{int64(ctx - 1)}})}
	for _, t := range past {
		in = append(in, t)
	}
	out := []ort.Value{newFloatTensor(b, 1, 1, int64(r.cfg.VocabSize))}
	for range past {
		out = append(out, newFloatTensor(b, 1, int64(r.cfg.NumHeads), int64(ctx), int64(r.cfg.HeadDim)))
	}
	defer func() {
		for _, v := range append(in[:3], out...) {
			v.Destroy()
		}
	}()
	b.ResetTimer()
	for b.Loop() {
		if err := r.sess.Run(in, out); err != nil {
			b.Fatal(err)
		}
	}
}

func newFloatTensor(tb testing.TB, dims ...int64) *ort.Tensor[float32] {
	tb.Helper()
	t, err := ort.NewEmptyTensor[float32](ort.NewShape(dims...))
	if err != nil {
		tb.Fatalf("output tensor: %v", err)
	}
	return t
}

func TestShapeOptionsRefused(t *testing.T) {
	for name, o := range map[string]Options{
		"kv type":       {KVType: "float64"},
		"kv cache":      {KVCache: "paged"},
		"logits type":   {LogitsType: "int8"},
		"merges":        {Merges: -1},
		"empty special": {SpecialTokens: []string{""}},
	} {
		if err := Write(t.TempDir(), o); err == nil {
			t.Errorf("%s: accepted %+v", name, o)
		}
	}
}

func TestLearnMerges(t *testing.T) {
	text := "low lower lowest low low newer newest"
	merges, symbols := learnMerges(text, 50)
	again, _ := learnMerges(text, 50)
	if fmt.Sprint(merges) != fmt.Sprint(again) {
		t.Fatal("merges differ between runs")
	}
	// "lo" and "ow" are the most frequent pairs (5 each); at a tie the
	// smaller pair goes first.
	if len(merges) == 0 || merges[0] != [2]string{"l", "o"} {
		t.Errorf("first merge %v, want [l o]", merges[:min(1, len(merges))])
	}
	seen := map[string]bool{}
	for _, s := range symbols {
		if seen[s] {
			t.Errorf("symbol %q listed twice", s)
		}
		seen[s] = true
	}
	for i, m := range merges {
		if !seen[m[0]+m[1]] {
			t.Errorf("merge %d %v makes %q, not among the symbols", i, m, m[0]+m[1])
		}
	}
	if !seen["Ġlow"] {
		t.Errorf("symbols %q lack \"Ġlow\"", symbols)
	}
}

func TestOwnTokenizerIsCopied(t *testing.T) {
	src := t.TempDir()
	// A SentencePiece-style vocabulary of 300 ids plus one added token
	// past it; the config names its eos as an AddedToken object.
	vocab := map[string]int{}
	for id := range 300 {
		vocab[fmt.Sprintf("<tok%d>", id)] = id
	}
	tok, err := json.Marshal(map[string]any{
		"added_tokens": []map[string]any{{"id": 300, "content": "<end>", "special": true}},
		"model":        map[string]any{"type": "BPE", "vocab": vocab, "merges": []string{}},
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg := []byte(`{"eos_token": {"content": "<end>", "lstrip": false}, "chat_template": "{{ messages[0].content }}"}`)
	for name, data := range map[string][]byte{TokenizerFile: tok, TokenizerConfigFile: cfg, ChatTemplateFile: []byte("{{ bos_token }}")} {
		if err := os.WriteFile(filepath.Join(src, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	if err := Write(dir, Options{Random: true, Layers: 1, Heads: 1, Hidden: 16, Context: 64, Tokenizer: src}); err != nil {
		t.Fatalf("Write: %v", err)
	}
	for _, name := range []string{TokenizerFile, TokenizerConfigFile, ChatTemplateFile} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		want, _ := os.ReadFile(filepath.Join(src, name))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: not copied as it is (err %v)", name, err)
		}
	}
	r := newRunner(t, dir)
	if r.cfg.VocabSize != 301 || r.cfg.EOSToken != "<end>" || r.cfg.ChatTemplate != "" {
		t.Errorf("model.json %+v: want vocab_size 301, eos_token <end> and no chat_template", r.cfg)
	}

	if err := os.Remove(filepath.Join(src, TokenizerConfigFile)); err != nil {
		t.Fatal(err)
	}
	if err := Write(t.TempDir(), Options{Random: true, Tokenizer: src}); err == nil || !strings.Contains(err.Error(), "tokenizer_config.json is missing") {
		t.Errorf("got %v, want an error naming the missing tokenizer_config.json", err)
	}
}

// A model written with external data must compute exactly what the same
// model with inline weights computes, keep almost nothing but the graph in
// model.onnx, and start every initializer in the data file at an aligned
// offset, or ONNX Runtime could not map it.
func TestExternalDataMatchesInline(t *testing.T) {
	opts := Options{Random: true, Layers: 2, Heads: 4, Hidden: 64, Context: 128, Seed: 9}
	inline, external := t.TempDir(), t.TempDir()
	if err := Write(inline, opts); err != nil {
		t.Fatalf("Write inline: %v", err)
	}
	opts.ExternalData = true
	if err := Write(external, opts); err != nil {
		t.Fatalf("Write external: %v", err)
	}
	if _, err := os.Stat(filepath.Join(inline, DataFile)); !os.IsNotExist(err) {
		t.Errorf("inline model has %s: %v", DataFile, err)
	}
	inInfo, err := os.Stat(filepath.Join(inline, ModelFile))
	if err != nil {
		t.Fatal(err)
	}
	exInfo, err := os.Stat(filepath.Join(external, ModelFile))
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(external, DataFile))
	if err != nil {
		t.Fatal(err)
	}
	weights := randomShape(opts.withDefaults()).bytes()
	if exInfo.Size() > inInfo.Size()-weights*9/10 {
		t.Errorf("model.onnx with external data is %d bytes, inline %d: the weights (%d bytes) did not move out", exInfo.Size(), inInfo.Size(), weights)
	}
	if int64(len(data)) < weights*9/10 {
		t.Errorf("%s is %d bytes, want about the %d bytes of weights", DataFile, len(data), weights)
	}

	s, w := randomWeights(opts.withDefaults())
	g := buildGraph(s, w)
	externalize(&g)
	moved := 0
	for _, init := range g.inits {
		if init.ext == nil {
			continue
		}
		moved++
		if init.ext.offset%dataAlign != 0 {
			t.Errorf("%s at offset %d, not a multiple of %d", init.name, init.ext.offset, dataAlign)
		}
	}
	if moved == 0 {
		t.Fatal("no initializer moved to the data file")
	}

	a, b := newRunner(t, inline), newRunner(t, external)
	prompt := bytesToIDs("external data")
	ca, cb := a.emptyCache(t, 1), b.emptyCache(t, 1)
	la, na := a.step(t, [][]int64{prompt}, [][]int64{maskOnes(len(prompt))}, [][]int64{iota64(0, len(prompt))}, ca)
	lb, nb := b.step(t, [][]int64{prompt}, [][]int64{maskOnes(len(prompt))}, [][]int64{iota64(0, len(prompt))}, cb)
	for _, c := range []cache{ca, cb, na, nb} {
		c.destroy()
	}
	for i := range la[0] {
		if d := maxAbsDiff(la[0][i], lb[0][i]); d != 0 {
			t.Fatalf("position %d: logits differ by %g between inline and external weights", i, d)
		}
	}
}
