package onnxgen

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Files a real model directory carries beside tokenizer.json.
const (
	TokenizerConfigFile  = "tokenizer_config.json"
	ChatTemplateFile     = "chat_template.jinja"
	GenerationConfigFile = "generation_config.json"
)

type namedFile struct {
	name string
	data []byte
}

// ownTokenizer is a real model's tokenizer, copied as it is beside
// random weights: the files, the number of token ids they define and the
// token that ends a document.
type ownTokenizer struct {
	files []namedFile
	vocab int
	eos   string
}

// readOwnTokenizer reads dir's tokenizer.json and tokenizer_config.json
// and, when present, chat_template.jinja and generation_config.json. Only
// what the weights must agree with is read here (the largest token id)
// and what model.json needs (eos_token); the worker's loader validates
// the rest.
func readOwnTokenizer(dir string) (*ownTokenizer, error) {
	tokData, err := os.ReadFile(filepath.Join(dir, TokenizerFile))
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	var tok struct {
		AddedTokens []struct {
			ID int `json:"id"`
		} `json:"added_tokens"`
		Model struct {
			Vocab json.RawMessage `json:"vocab"`
		} `json:"model"`
	}
	if err := json.Unmarshal(tokData, &tok); err != nil {
		return nil, fmt.Errorf("tokenizer: %s: %w", TokenizerFile, err)
	}
	maxID := -1
	for _, a := range tok.AddedTokens {
		maxID = max(maxID, a.ID)
	}
	// BPE and WordPiece keep a token -> id object, Unigram a list of
	// [piece, score] pairs whose index is the id.
	var byName map[string]int
	var pairs []json.RawMessage
	switch {
	case json.Unmarshal(tok.Model.Vocab, &byName) == nil:
		for _, id := range byName {
			maxID = max(maxID, id)
		}
	case json.Unmarshal(tok.Model.Vocab, &pairs) == nil:
		maxID = max(maxID, len(pairs)-1)
	default:
		return nil, fmt.Errorf("tokenizer: %s: model.vocab is neither an object nor a list", TokenizerFile)
	}
	if maxID < 0 {
		return nil, fmt.Errorf("tokenizer: %s defines no tokens", TokenizerFile)
	}
	own := &ownTokenizer{files: []namedFile{{TokenizerFile, tokData}}, vocab: maxID + 1}

	cfgData, err := os.ReadFile(filepath.Join(dir, TokenizerConfigFile))
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("tokenizer: %s is missing: model.json's eos_token comes from it", TokenizerConfigFile)
	case err != nil:
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	var cfg struct {
		EOS json.RawMessage `json:"eos_token"`
	}
	if err := json.Unmarshal(cfgData, &cfg); err != nil {
		return nil, fmt.Errorf("tokenizer: %s: %w", TokenizerConfigFile, err)
	}
	// A token is written as its text or as an AddedToken object.
	var obj struct {
		Content string `json:"content"`
	}
	if json.Unmarshal(cfg.EOS, &own.eos) != nil && json.Unmarshal(cfg.EOS, &obj) == nil {
		own.eos = obj.Content
	}
	if own.eos == "" {
		return nil, fmt.Errorf("tokenizer: %s: eos_token is missing or empty", TokenizerConfigFile)
	}
	own.files = append(own.files, namedFile{TokenizerConfigFile, cfgData})

	for _, name := range []string{ChatTemplateFile, GenerationConfigFile} {
		switch data, err := os.ReadFile(filepath.Join(dir, name)); {
		case err == nil:
			own.files = append(own.files, namedFile{name, data})
		case !errors.Is(err, os.ErrNotExist):
			return nil, fmt.Errorf("tokenizer: %w", err)
		}
	}
	return own, nil
}
