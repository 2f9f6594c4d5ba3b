package workerpool_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	onnxrt "github.com/yalue/onnxruntime_go"

	"h3infer/engine"
	"h3infer/infer"
	"h3infer/internal/onnxgen"
	"h3infer/ort"
	"h3infer/workerconf"
	"h3infer/workerpool"
)

// utf8Corpus is demo text whose characters are mostly more than one byte
// long for some runs, so that a byte-level model writes them a byte per
// token and the stream has to hold partial characters back.
const utf8Corpus = "Grüße aus Köln! Über der Brücke weht ein kühler Wind, und im Café gegenüber " +
	"gibt es Crème brûlée für zwei Euro — süß und schön. Über Nacht fährt der Zug nach Zürich, " +
	"wo es Käse gibt. Grüße aus 東京 und Grüße aus Köln."

// shapeFixture is one export shape the workers must serve: how onnxgen
// writes it and what its graph must look like, so that the test cannot
// pass on a shape other than the one it names.
type shapeFixture struct {
	name      string
	opts      onnxgen.Options
	positions bool                         // graph has position_ids
	kv        onnxrt.TensorElementDataType // cache element type
	logits    onnxrt.TensorElementDataType // logits element type
	submits   func(model string) []infer.Request
	check     func(t *testing.T, texts []string) // extra checks on the worker's texts
}

func chatmlTokens() []string { return []string{"<|im_start|>", "<|im_end|>"} }

func llama3Tokens() []string {
	return []string{"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
}

func defaultSubmits(prompt string, chat bool) func(model string) []infer.Request {
	return func(model string) []infer.Request {
		s := []infer.Request{
			{Model: model, Prompt: prompt, MaxTokens: 48},
			{Model: model, Prompt: prompt + "a", MaxTokens: 40, Temperature: 0.9, TopP: 0.95, Seed: 17, HasSeed: true},
			{Model: model, Prompt: strings.Repeat(prompt, 3), MaxTokens: 36},
		}
		if chat {
			s = append(s, infer.Request{Model: model, MaxTokens: 32, Messages: []infer.ChatMessage{
				{Role: "system", Content: "Answer briefly."}, {Role: "user", Content: prompt}}})
		}
		return s
	}
}

func shapeFixtures() []shapeFixture {
	var f32, f16, bf16 onnxrt.TensorElementDataType = onnxrt.TensorElementDataTypeFloat, onnxrt.TensorElementDataTypeFloat16, onnxrt.TensorElementDataTypeBFloat16
	return []shapeFixture{{
		name: "gpt2-no-position-ids", opts: onnxgen.Options{NoPositionIDs: true},
		kv: f32, logits: f32, submits: defaultSubmits("The gateway ", true),
	}, {
		name: "float16-kv-llama3", opts: onnxgen.Options{KVType: "float16", ChatTemplate: "llama3", SpecialTokens: llama3Tokens()},
		positions: true, kv: f16, logits: f32, submits: defaultSubmits("The worker ", true),
	}, {
		name: "float16-kv-and-logits", opts: onnxgen.Options{KVType: "float16", LogitsType: "float16", NoPositionIDs: true},
		kv: f16, logits: f16, submits: defaultSubmits("Streaming ", true),
	}, {
		name: "bfloat16-kv-and-logits", opts: onnxgen.Options{KVType: "bfloat16", LogitsType: "bfloat16"},
		positions: true, kv: bf16, logits: bf16, submits: defaultSubmits("A token ", false),
	}, {
		name: "bpe-merges-chatml", opts: onnxgen.Options{Merges: 300, ChatTemplate: "chatml", SpecialTokens: chatmlTokens()},
		positions: true, kv: f32, logits: f32, submits: defaultSubmits("The gateway sits at the edge", true),
	}, {
		name: "bpe-random", opts: onnxgen.Options{Random: true, Merges: 300, Layers: 2, Heads: 2, Hidden: 64, Context: 512, Seed: 5, KVType: "float16"},
		positions: true, kv: f16, logits: f32, submits: defaultSubmits("Batching keeps ", false),
	}, {
		name: "append-kv", opts: onnxgen.Options{KVCache: onnxgen.KVCacheAppend},
		positions: true, kv: f32, logits: f32, submits: defaultSubmits("The gateway ", true),
	}, {
		name: "append-kv-float16-no-position-ids", opts: onnxgen.Options{KVCache: onnxgen.KVCacheAppend, KVType: "float16", NoPositionIDs: true},
		kv: f16, logits: f32, submits: defaultSubmits("Each step ", true),
	}, {
		name: "utf8", opts: onnxgen.Options{Corpus: utf8Corpus, Merges: 40, NoPositionIDs: true, KVType: "float16"},
		kv: f16, logits: f32, submits: defaultSubmits("Grüße aus ", false),
		check: func(t *testing.T, texts []string) {
			multi := 0
			for _, s := range texts {
				for _, r := range s {
					if utf8.RuneLen(r) > 1 && r != utf8.RuneError {
						multi++
					}
				}
			}
			// The greedy continuations walk the corpus, so they must carry
			// its umlauts; without them the test would not test holding.
			if multi < 5 {
				t.Errorf("only %d multi-byte characters in %q", multi, texts)
			}
		},
	}}
}

// checkSignature fails t unless the graph in dir has the fixture's shape.
func checkSignature(t *testing.T, dir string, f shapeFixture) {
	t.Helper()
	ins, outs, err := onnxrt.GetInputOutputInfo(filepath.Join(dir, onnxgen.ModelFile))
	if err != nil {
		t.Fatal(err)
	}
	hasPos := slices.ContainsFunc(ins, func(i onnxrt.InputOutputInfo) bool { return i.Name == onnxgen.PositionIDs })
	if hasPos != f.positions {
		t.Errorf("%s: position_ids present %v, want %v", f.name, hasPos, f.positions)
	}
	for _, i := range ins {
		if strings.HasPrefix(i.Name, "past_key_values.") && i.DataType != f.kv {
			t.Errorf("%s: input %s is %s, want %s", f.name, i.Name, i.DataType, f.kv)
		}
	}
	for _, o := range outs {
		if o.Name == onnxgen.Logits && o.DataType != f.logits {
			t.Errorf("%s: logits are %s, want %s", f.name, o.DataType, f.logits)
		}
		if strings.HasPrefix(o.Name, "present.") && o.DataType != f.kv {
			t.Errorf("%s: output %s is %s, want %s", f.name, o.Name, o.DataType, f.kv)
		}
	}
}

// Every export shape is served by a real worker process: requests batched
// together in the worker give exactly the text and usage that the model
// gives each alone in process (engine.Generate, a batch of one), and every
// streamed chunk is whole UTF-8.
func TestExportShapesThroughWorker(t *testing.T) {
	_, lib := workerpool.DemoModelForTest(t)
	root := t.TempDir()
	fixtures := shapeFixtures()
	var specs []workerconf.Model
	refs := map[string]*reference{}
	for _, f := range fixtures {
		dir := filepath.Join(root, f.name)
		if err := onnxgen.Write(dir, f.opts); err != nil {
			t.Fatalf("%s: %v", f.name, err)
		}
		checkSignature(t, dir, f)
		refs[f.name] = loadReference(t, dir, f.name)
		specs = append(specs, workerconf.Model{Name: f.name, Dir: dir})
	}
	t.Setenv(workerpool.WorkerEnvForTest, "1")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	const slots = 4
	p, err := workerpool.New(workerpool.Config{
		Workers:        1,
		Executable:     exe,
		Worker:         workerconf.Settings{Models: specs, ORTLib: lib, Slots: slots},
		RestartBackoff: 50 * time.Millisecond,
		StopGrace:      5 * time.Second,
	}, workerpool.LoggerForTest(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	w := p.Processes()[0]
	id := uint64(0)
	for _, f := range fixtures {
		t.Run(f.name, func(t *testing.T) {
			ref := refs[f.name]
			subs := f.submits(f.name)
			if len(subs) > slots {
				t.Fatalf("%d submits, worker has %d slots", len(subs), slots)
			}
			// All open before any is drained, so the worker batches them.
			calls := make([]infer.Call, len(subs))
			for i := range subs {
				id++
				c, err := w.Open(id, &subs[i])
				if err != nil {
					t.Fatal(err)
				}
				calls[i] = c
			}
			texts := make([]string, len(subs))
			var wg sync.WaitGroup
			for i, c := range calls {
				wg.Go(func() {
					var chunks []string
					var done *infer.Done
					timeout := time.After(60 * time.Second)
				read:
					for {
						select {
						case ev, ok := <-c.Events():
							if !ok {
								break read
							}
							if ev.Err != nil {
								t.Errorf("request %d: error %+v", i, ev.Err)
							}
							if ev.Done != nil {
								done = ev.Done
							}
							chunks = append(chunks, ev.Token.Text)
						case <-timeout:
							t.Errorf("request %d did not end", i)
							return
						}
					}
					got := strings.Join(chunks, "")
					texts[i] = got
					for k, ch := range chunks {
						// A random model emits invalid byte sequences, which
						// must arrive as U+FFFD; trained text never needs it.
						if !utf8.ValidString(ch) || (!f.opts.Random && strings.ContainsRune(ch, utf8.RuneError)) {
							t.Errorf("request %d: chunk %d %q is not whole UTF-8", i, k, ch)
						}
					}
					want, wantDone, err := ref.generate(&subs[i])
					if err != nil {
						t.Error(err)
						return
					}
					if done == nil || got != want || *done != wantDone {
						t.Errorf("request %d %+v:\nworker   %q %+v\nGenerate %q %+v", i, subs[i], got, done, want, wantDone)
					}
					if wantDone.CompletionTokens < 8 {
						t.Errorf("request %d: only %d tokens; the comparison needs a longer text", i, wantDone.CompletionTokens)
					}
				})
			}
			wg.Wait()
			if f.check != nil {
				f.check(t, texts)
			}
		})
	}
}

// Without position_ids the graph derives positions from attention_mask;
// they must be the positions the worker would have passed, so the text is
// the demo's own.
func TestNoPositionIDsMatchesDemo(t *testing.T) {
	demoDir, _ := workerpool.DemoModelForTest(t)
	demo, err := ort.LoadModel(demoDir, ort.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer demo.Close()
	dir := t.TempDir()
	if err := onnxgen.Write(dir, onnxgen.Options{NoPositionIDs: true}); err != nil {
		t.Fatal(err)
	}
	m, err := ort.LoadModel(dir, ort.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	s := &infer.Request{Prompt: "The gateway ", MaxTokens: 120}
	want, _, err := engine.Generate(context.Background(), demo, s)
	if err != nil {
		t.Fatal(err)
	}
	got, _, err := engine.Generate(context.Background(), m, s)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Errorf("without position_ids %q\nwith position_ids    %q", got, want)
	}
}
