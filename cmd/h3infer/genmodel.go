package main

import (
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"

	"h3infer/internal/onnxgen"
)

func runGenmodel(args []string, stdout io.Writer) error {
	def := onnxgen.DefaultOptions()
	fs := flag.NewFlagSet("genmodel", flag.ContinueOnError)
	out := fs.String("out", "", "directory to write model.onnx, tokenizer.json and model.json into (required)")
	random := fs.Bool("random", def.Random, "seeded random weights of the given shape instead of the demo's readable weights")
	layers := fs.Int("layers", def.Layers, "transformer layers (with --random)")
	heads := fs.Int("heads", def.Heads, "attention heads (with --random)")
	hidden := fs.Int("hidden", def.Hidden, "hidden size (with --random)")
	context := fs.Int("context", def.Context, "context length in tokens")
	seed := fs.Int64("seed", def.Seed, "weight seed (with --random)")
	noPos := fs.Bool("no-position-ids", false, "leave position_ids out of the graph (GPT-2 style export)")
	kvType := fs.String("kv-type", "float32", "KV cache element type: float32, float16 or bfloat16")
	logitsType := fs.String("logits-type", "float32", "logits element type: float32, float16 or bfloat16")
	kvCache := fs.String("kv-cache", onnxgen.KVCacheConcat, "how present relates to past: concat (the usual export) or append (present holds only new positions; the runtime keeps the cache)")
	merges := fs.Int("merges", 0, "byte-level BPE merges to learn from the corpus for tokenizer.json")
	chat := fs.String("chat-template", "plain", "model.json chat_template; its special tokens must be given with --special-token")
	external := fs.Bool("external-data", false, "write the weights to model.onnx.data beside model.onnx (ONNX external data), as large exports do; worker processes then share one copy of them")
	tokenizer := fs.String("tokenizer", "", "directory of a real model's tokenizer.json and tokenizer_config.json (and chat_template.jinja) to copy beside --random weights, whose vocabulary then follows it")
	encoder := fs.Bool("encoder", false, "write a random-weight encoder for /v1/embeddings instead (input_ids, attention_mask → last_hidden_state); --layers, --heads, --hidden, --context, --seed and --merges shape it")
	pooling := fs.String("pooling", "mean", "with --encoder: model.json pooling, mean or cls")
	rawVectors := fs.Bool("raw", false, "with --encoder: leave vectors unnormalized (model.json normalize false)")
	noMatryoshka := fs.Bool("no-matryoshka", false, "with --encoder: refuse the dimensions parameter (model.json matryoshka false)")
	var special []string
	fs.Func("special-token", "add a special token to tokenizer.json (repeatable)", func(v string) error {
		special = append(special, v)
		return nil
	})
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *out == "" {
		return usagef("--out is required")
	}
	if *encoder {
		return writeEncoder(fs, *out, onnxgen.EncoderOptions{Seed: *seed, Merges: *merges, Pooling: *pooling, Raw: *rawVectors, NoMatryoshka: *noMatryoshka}, stdout)
	}
	chatSet := false
	fs.Visit(func(f *flag.Flag) { chatSet = chatSet || f.Name == "chat-template" })
	if *tokenizer != "" && !chatSet {
		*chat = "" // the model's own template, from tokenizer_config.json
	}
	opts := onnxgen.Options{Layers: *layers, Heads: *heads, Hidden: *hidden, Context: *context, Seed: *seed, Random: *random,
		NoPositionIDs: *noPos, KVType: *kvType, LogitsType: *logitsType, KVCache: *kvCache, Merges: *merges, ChatTemplate: *chat, SpecialTokens: special, Tokenizer: *tokenizer, ExternalData: *external}
	if err := onnxgen.Write(*out, opts); err != nil {
		return err
	}
	files := "model.onnx"
	if *external {
		files = "model.onnx, model.onnx.data"
	}
	fmt.Fprintf(stdout, "h3infer genmodel: wrote %s, tokenizer.json and model.json to %s\n", files, *out)
	return nil
}

// writeEncoder is genmodel --encoder: the shape flags the command line
// set override the encoder's own defaults, not the demo decoder's.
func writeEncoder(fs *flag.FlagSet, out string, opts onnxgen.EncoderOptions, stdout io.Writer) error {
	var bad []string
	fs.Visit(func(f *flag.Flag) {
		v, _ := strconv.Atoi(f.Value.String())
		switch f.Name {
		case "layers":
			opts.Layers = v
		case "heads":
			opts.Heads = v
		case "hidden":
			opts.Hidden = v
		case "context":
			opts.Context = v
		case "encoder", "out", "seed", "merges", "pooling", "raw", "no-matryoshka", "random":
		default:
			bad = append(bad, "--"+f.Name)
		}
	})
	if len(bad) > 0 {
		return usagef("--encoder: %s do not apply to an encoder", strings.Join(bad, ", "))
	}
	if err := onnxgen.WriteEncoder(out, opts); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "h3infer genmodel: wrote an encoder's model.onnx, tokenizer.json and model.json to %s\n", out)
	return nil
}
