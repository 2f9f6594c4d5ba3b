package tokenizers

import (
	"errors"
	"path/filepath"
	"unicode/utf8"

	"h3infer/infer"
	"h3infer/tokenize"
	"h3infer/workerconf"
)

// Model is one model version's tokenizer and chat template, as its
// worker uses them. It is immutable and safe for concurrent use.
//
// This file is the only one that calls package tokenize: when tokenize's
// API changes, the change to /tokenize is here.
type Model struct {
	tok           *tokenize.Tokenizer
	template      *tokenize.ChatTemplate
	contextLength int
}

// load reads dir's model.json and tokenizer.json as the worker does
// (ort.LoadModel), without the graph.
func load(dir string) (*Model, error) {
	cfg, err := workerconf.ReadModelConfig(dir)
	if err != nil {
		return nil, err
	}
	tok, err := tokenize.Load(filepath.Join(dir, workerconf.TokenizerFile))
	if err != nil {
		return nil, err
	}
	tmpl, err := cfg.LoadChatTemplate(dir)
	if err != nil {
		return nil, err
	}
	return &Model{tok: tok, template: tmpl, contextLength: cfg.ContextLength}, nil
}

// EncodePrompt is the token ids of a text prompt. addSpecial adds the
// tokens the tokenizer's post-processor adds (a BOS, say), as the worker
// does for a completion's prompt.
func (m *Model) EncodePrompt(text string, addSpecial bool) []int {
	if addSpecial {
		return m.tok.EncodeSpecial(text)
	}
	return m.tok.Encode(text)
}

// EncodeChat is the token ids of a conversation rendered with the model's
// chat template, as the worker renders and encodes it. addSpecial is as
// for EncodePrompt. An error is a *tokenize.ConversationError when the
// conversation is the request's fault (the template refused it), else the
// model's.
func (m *Model) EncodeChat(msgs []infer.ChatMessage, addGenerationPrompt, addSpecial bool) ([]int, error) {
	text, err := m.template.Render(msgs, addGenerationPrompt)
	if err != nil {
		if ce, ok := errors.AsType[*tokenize.ConversationError](err); ok {
			return nil, &ConversationError{Message: ce.Message}
		}
		return nil, err
	}
	return m.EncodePrompt(text, addSpecial), nil
}

// ConversationError is a conversation the model's chat template refuses:
// the request's fault, with the template's own message.
type ConversationError struct{ Message string }

func (e *ConversationError) Error() string { return e.Message }

// BadRequest marks the error as the request's, for the gateway, which
// does not import this package.
func (e *ConversationError) BadRequest() bool { return true }

// Decode is the text of ids, special tokens included (as vLLM's
// /detokenize and Hugging Face's decode by default). Bytes that are not
// UTF-8 become U+FFFD. Ids outside the vocabulary decode to nothing:
// callers check them against VocabSize first.
func (m *Model) Decode(ids []int) string {
	return validUTF8([]byte(m.tok.Decode(ids, false)))
}

// TokenStrings is each id's entry in the vocabulary, as Hugging Face's
// convert_ids_to_tokens gives it: an added token's content, else the
// model's spelling ("Ġworld" for byte-level " world").
func (m *Model) TokenStrings(ids []int) []string {
	out := make([]string, len(ids))
	for i, id := range ids {
		out[i], _ = m.tok.Token(id)
	}
	return out
}

// validUTF8 is b with each byte that is not part of valid UTF-8 replaced
// by U+FFFD, as Python's errors="replace" and encoding/json do.
func validUTF8(b []byte) string {
	if utf8.Valid(b) {
		return string(b)
	}
	out := make([]byte, 0, len(b)+8)
	for len(b) > 0 {
		r, n := utf8.DecodeRune(b)
		out = utf8.AppendRune(out, r) // RuneError for an invalid byte, n == 1
		b = b[n:]
	}
	return string(out)
}

// VocabSize is one past the largest token id.
func (m *Model) VocabSize() int { return m.tok.VocabSize() }

// ContextLength is the version's context in tokens (model.json's
// context_length), vLLM's max_model_len.
func (m *Model) ContextLength() int { return m.contextLength }
