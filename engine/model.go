package engine

import (
	"h3infer/infer"
	"h3infer/tokenize"
)

// Model is a language model as the loop drives it: a vocabulary, a
// prefill that runs one prompt alone, and one batch of sequences that a
// decode step advances together, one token each.
//
// Rows of the batch are numbered from 0 in the order they joined, except
// that a row that leaves hands its number to the last row; the loop keeps
// its sequences in the same order.
//
// Prefill and the vocabulary may be called while a Step runs on another
// goroutine (a bulk step on the bulk lane while the loop prefills an
// urgent request), so they must not touch the batch. Join, Leave and Step
// are called one at a time.
type Model interface {
	// Info names the model and says its context length.
	Info() infer.ModelInfo
	// ChatTemplate formats a chat as this model's prompt.
	ChatTemplate() *tokenize.ChatTemplate
	// Encode turns prompt text into token ids, adding no special
	// tokens: a chat template's rendered text writes its own.
	Encode(text string) []int
	// EncodeSpecial is Encode with the special tokens the tokenizer adds
	// to a text (a BOS, say), which a raw completion prompt gets.
	EncodeSpecial(text string) []int
	// Piece is the bytes token id stands for, not necessarily whole
	// UTF-8, and whether the token ends a sequence (end of text, end of
	// turn).
	Piece(id int) (piece string, end bool)

	// Prefill runs ids alone from an empty cache. It returns the logits
	// of the last position and the prompt's cache, which the loop hands,
	// unread, to Join.
	Prefill(ids []int) (logits []float32, cache [][]byte, err error)
	// Join adds a prefilled prompt of n tokens as the batch's last row.
	// It copies cache and keeps none of it: the loop joins one prefill's
	// cache as several rows, one per choice of a request for n.
	Join(cache [][]byte, n int)
	// Leave removes row r; the last row takes its number.
	Leave(r int)
	// Step feeds row r the token next[r], every row at once, and returns
	// their logits: row r's at [r*V, (r+1)*V) for V = len(logits)/len(next),
	// valid until the next Step.
	Step(next []int) (logits []float32, err error)
	// KVBytes bounds the cache memory of a batch of rows sequences that
	// reach up to longest tokens each; it is what the loop counts against
	// the worker's KV-cache budget.
	KVBytes(rows, longest int) int64
	// Close releases the model, with any rows still in its batch.
	Close() error
}
