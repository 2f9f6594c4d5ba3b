package onnxgen

import (
	"bytes"
	"encoding/json"
	"fmt"
)

// EndOfText is the special token that ends a document; the demo model
// predicts it where its corpus ends.
const EndOfText = "<|endoftext|>"

// tokenizerFile is the Hugging Face tokenizer.json layout for a byte-level
// BPE tokenizer. Token id b is byte b; merged tokens, when merges were
// learned, follow <|endoftext|>.
type tokenizerFile struct {
	Version       string          `json:"version"`
	Truncation    *struct{}       `json:"truncation"`
	Padding       *struct{}       `json:"padding"`
	AddedTokens   []addedToken    `json:"added_tokens"`
	Normalizer    *struct{}       `json:"normalizer"`
	PreTokenizer  byteLevelConfig `json:"pre_tokenizer"`
	PostProcessor byteLevelConfig `json:"post_processor"`
	Decoder       byteLevelConfig `json:"decoder"`
	Model         bpeModel        `json:"model"`
}

type addedToken struct {
	ID         int    `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

type byteLevelConfig struct {
	Type           string `json:"type"`
	AddPrefixSpace bool   `json:"add_prefix_space"`
	TrimOffsets    bool   `json:"trim_offsets"`
	UseRegex       bool   `json:"use_regex"`
}

type bpeModel struct {
	Type                    string       `json:"type"`
	Dropout                 *float64     `json:"dropout"`
	UnkToken                *string      `json:"unk_token"`
	ContinuingSubwordPrefix *string      `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string      `json:"end_of_word_suffix"`
	FuseUnk                 bool         `json:"fuse_unk"`
	ByteFallback            bool         `json:"byte_fallback"`
	IgnoreMerges            bool         `json:"ignore_merges"`
	Vocab                   orderedVocab `json:"vocab"`
	Merges                  []string     `json:"merges"`
}

// orderedVocab marshals as a JSON object in id order, which a Go map would
// not keep, so the file reads naturally and is byte-for-byte reproducible.
type orderedVocab []string

func (v orderedVocab) MarshalJSON() ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	buf.WriteByte('{')
	for id, tok := range v {
		if id > 0 {
			buf.WriteByte(',')
		}
		// Encode appends a newline, which is valid JSON whitespace.
		if err := enc.Encode(tok); err != nil {
			return nil, fmt.Errorf("vocab entry %d: %w", id, err)
		}
		fmt.Fprintf(&buf, ":%d", id)
	}
	buf.WriteByte('}')
	return buf.Bytes(), nil
}

// ByteToUnicode returns the character that byte-level tokenizers use to
// spell byte b in their vocabulary: printable Latin-1 bytes stand for
// themselves, the rest are moved to U+0100 onwards in byte order.
func ByteToUnicode(b byte) rune {
	if printableByte(b) {
		return rune(b)
	}
	shifted := 0
	for c := 0; c < int(b); c++ {
		if !printableByte(byte(c)) {
			shifted++
		}
	}
	return rune(256 + shifted)
}

func printableByte(b byte) bool {
	return ('!' <= b && b <= '~') || (0xA1 <= b && b <= 0xAC) || (0xAE <= b)
}

// tokenizerSpec is what a tokenizer holds beyond the 256 byte tokens and
// <|endoftext|>: learned merges with the symbols they create (ids from
// endOfText+1 on), then extra special tokens.
type tokenizerSpec struct {
	merges  [][2]string
	symbols []string
	special []string
}

// size is the number of token ids the spec defines.
func (t tokenizerSpec) size() int { return endOfText + 1 + len(t.symbols) + len(t.special) }

// tokenizerJSON renders the tokenizer for a model of the given vocabulary
// size, at least spec.size(). Ids past the spec's tokens (random models with
// a larger vocab) become reserved special tokens so that tokenizer and
// logits agree.
func tokenizerJSON(spec tokenizerSpec, vocab int) ([]byte, error) {
	vocabEntries := make(orderedVocab, 256)
	for b := range 256 {
		vocabEntries[b] = string(ByteToUnicode(byte(b)))
	}
	added := []addedToken{{ID: endOfText, Content: EndOfText, Special: true}}
	vocabEntries = append(vocabEntries, EndOfText)
	vocabEntries = append(vocabEntries, spec.symbols...)
	for _, s := range spec.special {
		added = append(added, addedToken{ID: len(vocabEntries), Content: s, Special: true})
		vocabEntries = append(vocabEntries, s)
	}
	for id := len(vocabEntries); id < vocab; id++ {
		s := fmt.Sprintf("<|reserved_%d|>", id)
		added = append(added, addedToken{ID: id, Content: s, Special: true})
		vocabEntries = append(vocabEntries, s)
	}
	merges := make([]string, len(spec.merges))
	for i, m := range spec.merges {
		merges[i] = m[0] + " " + m[1]
	}
	byteLevel := byteLevelConfig{Type: "ByteLevel", TrimOffsets: true, UseRegex: true}
	f := tokenizerFile{
		Version:       "1.0",
		AddedTokens:   added,
		PreTokenizer:  byteLevel,
		PostProcessor: byteLevel,
		Decoder:       byteLevel,
		Model: bpeModel{
			Type:   "BPE",
			Vocab:  vocabEntries,
			Merges: merges,
		},
	}
	out, err := marshalJSON(f)
	if err != nil {
		return nil, fmt.Errorf("encode tokenizer.json: %w", err)
	}
	return out, nil
}
