package tokenize

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// refVariants edit real tokenizer files to reach the parts of the
// pipeline none of the six models uses as shipped (added tokens' lstrip,
// rstrip, single_word and normalized; Lowercase, Strip and regex Replace
// normalizers; Metaspace, Digits, Punctuation and Whitespace
// pre-tokenizers), and the reference runs the edited file too.
var refVariants = map[string]struct {
	base string
	edit func(f map[string]any)
}{
	"added-token-options": {"qwen3", func(f map[string]any) {
		added := f["added_tokens"].([]any)
		for _, a := range added {
			a := a.(map[string]any)
			switch a["content"] {
			case "<|im_start|>":
				a["lstrip"] = true
			case "<|im_end|>":
				a["rstrip"] = true
			}
		}
		next := 151669.0 // right after the file's own added tokens, as real files number them
		for i, w := range []map[string]any{
			{"content": "gatewayz", "single_word": true, "normalized": true, "special": false},
			{"content": "café", "single_word": false, "normalized": true, "special": false},
			{"content": "<s>", "lstrip": true, "rstrip": true, "normalized": false, "special": true},
		} {
			w["id"] = next + float64(i)
			for _, k := range []string{"single_word", "lstrip", "rstrip"} {
				if _, ok := w[k]; !ok {
					w[k] = false
				}
			}
			added = append(added, w)
		}
		f["added_tokens"] = added
	}},
	"normalizers": {"llama2", func(f map[string]any) {
		f["normalizer"] = map[string]any{"type": "Sequence", "normalizers": []any{
			map[string]any{"type": "NFKC"},
			map[string]any{"type": "Lowercase"},
			map[string]any{"type": "Strip", "strip_left": true, "strip_right": true},
			map[string]any{"type": "Replace", "pattern": map[string]any{"Regex": `\s+`}, "content": " "},
			map[string]any{"type": "Prepend", "prepend": "▁"},
			map[string]any{"type": "Replace", "pattern": map[string]any{"String": " "}, "content": "▁"},
		}}
	}},
	"metaspace": {"llama2", func(f map[string]any) {
		f["normalizer"] = nil
		f["pre_tokenizer"] = map[string]any{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true}
		f["decoder"] = map[string]any{"type": "Sequence", "decoders": []any{
			map[string]any{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true},
			map[string]any{"type": "ByteFallback"},
			map[string]any{"type": "Fuse"},
		}}
	}},
	"split-pre-tokenizers": {"llama3", func(f map[string]any) {
		f["pre_tokenizer"] = map[string]any{"type": "Sequence", "pretokenizers": []any{
			map[string]any{"type": "Digits", "individual_digits": true},
			map[string]any{"type": "Punctuation", "behavior": "Isolated"},
			map[string]any{"type": "WhitespaceSplit"},
			map[string]any{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": false},
		}}
	}},
	"whitespace": {"qwen3", func(f map[string]any) {
		f["pre_tokenizer"] = map[string]any{"type": "Sequence", "pretokenizers": []any{
			map[string]any{"type": "Whitespace"},
			map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
		}}
	}},
}

func TestReferenceVariants(t *testing.T) {
	texts, _ := corpusTexts(t)
	texts = append(texts, "  gatewayz gatewayzs Gatewayz xgatewayz gatewayz,  café CAFÉ cafés <|im_start|>  x  <|im_end|>  y <s> z")
	for name, v := range refVariants {
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(refPath(v.base))
			if err != nil {
				t.Fatal(err)
			}
			var f map[string]any
			if err := json.Unmarshal(data, &f); err != nil {
				t.Fatal(err)
			}
			v.edit(f)
			if data, err = json.Marshal(f); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(t.TempDir(), "tokenizer.json")
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
			tok, err := Load(path)
			if err != nil {
				t.Fatal(err)
			}
			compareWithReference(t, tok, path, texts)
		})
	}
}
