package main

import (
	"flag"
	"fmt"
	"io"

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
