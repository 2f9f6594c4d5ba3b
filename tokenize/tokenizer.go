package tokenize

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"unicode/utf8"
)

// Tokenizer is a Hugging Face tokenizer.json pipeline with a BPE model,
// reproducing the Rust tokenizers library token for token. It is
// immutable after loading (but for its word cache) and safe for
// concurrent use.
//
// Encoding splits out added tokens, normalizes the rest, splits it into
// words with the pre-tokenizer and turns each word into ids with the BPE
// model; EncodeSpecial then adds what the post-processor adds. Decoding
// runs the decoder chain over the tokens' strings.
type Tokenizer struct {
	model *bpe
	norm  normalizer   // nil: none
	pre   preTokenizer // nil: none
	dec   decoder      // nil: tokens are joined with spaces
	post  template

	added    []addedToken
	rawTrie  *trie // added tokens matched in the text as written
	normTrie *trie // added tokens matched in normalized text

	tokens  []string // id -> token string, "" where none
	known   []bool   // id -> has a token
	special []bool   // id -> skipped by Decode(ids, true)
	pieces  []string // id -> Piece

	scratch sync.Pool // *encodeScratch
}

type addedToken struct {
	id                                     int
	content                                string
	special, lstrip, rstrip, single, normd bool
}

type addedTokenJSON struct {
	ID         int    `json:"id"`
	Content    string `json:"content"`
	Special    bool   `json:"special"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	SingleWord bool   `json:"single_word"`
	Normalized bool   `json:"normalized"`
}

// maxIDGap is how far token ids may run past the number of tokens.
const maxIDGap = 1 << 16

// Load reads and parses the tokenizer.json at path.
func Load(path string) (*Tokenizer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read tokenizer: %w", err)
	}
	t, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

// Parse decodes and validates tokenizer.json content. Every part it does
// not support is refused, naming its JSON path, all at once.
func Parse(data []byte) (*Tokenizer, error) {
	fields, err := objectFields(data)
	if err != nil {
		return nil, fmt.Errorf("decode tokenizer.json: %w", err)
	}
	t := &Tokenizer{}
	var errs []error
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	t.norm, err = parseNormalizer(fields["normalizer"], "normalizer")
	add(err)
	t.pre, err = parsePreTokenizer(fields["pre_tokenizer"], "pre_tokenizer")
	add(err)
	t.dec, err = parseDecoder(fields["decoder"], "decoder")
	add(err)
	t.post, err = parsePostProcessor(fields["post_processor"], "post_processor")
	add(err)
	for _, k := range []string{"truncation", "padding"} {
		if !isNull(fields[k]) {
			add(fmt.Errorf("%s: must be null", k))
		}
	}
	modelJSON, ok := fields["model"]
	if !ok {
		modelJSON = []byte("{}") // refused below for its missing type
	}
	t.model, err = parseBPE(modelJSON)
	add(err)
	var added []addedTokenJSON
	if raw := fields["added_tokens"]; !isNull(raw) {
		if err := json.Unmarshal(raw, &added); err != nil {
			add(fmt.Errorf("added_tokens: %w", err))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}

	maxID := -1
	for _, id := range t.model.vocab {
		maxID = max(maxID, id)
	}
	for i, a := range added {
		if a.Content == "" {
			add(fmt.Errorf("added_tokens[%d]: empty content", i))
			continue
		}
		if a.ID < 0 {
			add(fmt.Errorf("added_tokens[%d]: %q has negative id %d", i, a.Content, a.ID))
			continue
		}
		// A token the model's vocabulary already has keeps that id, as
		// Hugging Face's loader gives it whatever the file says.
		if id, ok := t.model.vocab[a.Content]; ok {
			a.ID = id
		}
		t.added = append(t.added, addedToken{
			id: a.ID, content: a.Content, special: a.Special,
			lstrip: a.LStrip, rstrip: a.RStrip, single: a.SingleWord, normd: a.Normalized,
		})
		maxID = max(maxID, a.ID)
	}
	// Ids index tables, so they must be close to dense; real vocabularies
	// are, and a stray huge id must not allocate gigabytes.
	if limit := len(t.model.vocab) + len(added) + maxIDGap; maxID >= limit {
		add(fmt.Errorf("token ids: largest is %d, want below %d (vocabulary size plus %d)", maxID, limit, maxIDGap))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}

	n := maxID + 1
	t.tokens, t.known, t.special, t.pieces = make([]string, n), make([]bool, n), make([]bool, n), make([]string, n)
	for tok, id := range t.model.vocab {
		t.tokens[id], t.known[id] = tok, true
	}
	specials := map[string]bool{}
	for _, a := range t.added {
		t.tokens[a.id], t.known[a.id] = a.content, true
		if a.special {
			specials[a.content] = true
		}
	}
	for id, tok := range t.tokens {
		// Hugging Face skips any token whose string is a special one's.
		t.special[id] = t.known[id] && specials[tok]
		if t.known[id] {
			if t.dec == nil {
				t.pieces[id] = " " + tok
			} else {
				t.pieces[id] = pieceOf(t.dec, tok)
			}
		}
	}
	var raw, normd []addedToken
	for _, a := range t.added {
		if a.normd && t.norm != nil {
			a.content = t.norm.normalize(a.content)
			if a.content == "" {
				continue
			}
		}
		if a.normd {
			normd = append(normd, a)
		} else {
			raw = append(raw, a)
		}
	}
	t.rawTrie, t.normTrie = newTrie(raw), newTrie(normd)
	return t, nil
}

// VocabSize is one past the largest token id.
func (t *Tokenizer) VocabSize() int { return len(t.tokens) }

// TokenID returns the id of a token written as text: an added token's
// content or a vocabulary entry.
func (t *Tokenizer) TokenID(s string) (int, bool) {
	for _, a := range t.added {
		if a.content == s {
			return a.id, true
		}
	}
	id, ok := t.model.vocab[s]
	return id, ok
}

// Token is id's entry in the vocabulary, an added token's content or the
// model's spelling of it (Hugging Face's id_to_token: "Ġworld" for
// byte-level " world", "▁world" for SentencePiece).
func (t *Tokenizer) Token(id int) (string, bool) {
	if id < 0 || id >= len(t.tokens) || !t.known[id] {
		return "", false
	}
	return t.tokens[id], true
}

// IsSpecial reports whether id is a special token: one Decode drops when
// asked to skip them, as a generated text does.
func (t *Tokenizer) IsSpecial(id int) bool {
	return id >= 0 && id < len(t.special) && t.special[id]
}

// SpecialID is the id of the special token whose content is s.
func (t *Tokenizer) SpecialID(s string) (int, bool) {
	for _, a := range t.added {
		if a.special && a.content == s {
			return a.id, true
		}
	}
	return 0, false
}

// IsAdded reports whether s is an added token's content, which Encode
// turns into that one token wherever it appears.
func (t *Tokenizer) IsAdded(s string) bool {
	for _, a := range t.added {
		if a.content == s {
			return true
		}
	}
	return false
}

// Encode turns text into token ids as Hugging Face's encode does with
// add_special_tokens=false: what a chat template's rendered text gets.
// Added tokens, special or not, are recognized in the text.
func (t *Tokenizer) Encode(text string) []int {
	return t.encode(text, nil)
}

// EncodeSpecial is Encode with add_special_tokens=true: the
// post-processor's tokens (a BOS, say) surround the ids. A raw completion
// prompt gets this.
func (t *Tokenizer) EncodeSpecial(text string) []int {
	ids := append([]int(nil), t.post.before...)
	ids = t.encode(text, ids)
	return append(ids, t.post.after...)
}

type encodeScratch struct {
	words, tmp []word
	buf        []byte
	syms       symbols
}

func (t *Tokenizer) encode(text string, ids []int) []int {
	sc, _ := t.scratch.Get().(*encodeScratch)
	if sc == nil {
		sc = &encodeScratch{}
	}
	defer t.scratch.Put(sc)
	t.rawTrie.split(text, func(seg string, at int, id int) {
		if id >= 0 {
			ids = append(ids, id)
			return
		}
		if t.norm != nil {
			seg = t.norm.normalize(seg)
		}
		t.normTrie.split(seg, func(sub string, subAt int, id int) {
			if id >= 0 {
				ids = append(ids, id)
				return
			}
			ids = t.encodeWords(word{s: sub, first: at == 0 && subAt == 0}, ids, sc)
		})
	})
	return ids
}

// encodeWords pre-tokenizes w and runs the model on each word.
func (t *Tokenizer) encodeWords(w word, ids []int, sc *encodeScratch) []int {
	words := append(sc.words[:0], w)
	if t.pre != nil {
		words = t.pre.split(w, sc.tmp[:0])
		sc.tmp = words
	}
	for _, w := range words {
		if w.bytes {
			sc.buf = appendByteLevel(sc.buf[:0], w.s)
			ids = t.model.encodeBytes(sc.buf, ids, &sc.syms)
		} else {
			ids = t.model.encode(w.s, ids, &sc.syms)
		}
	}
	clear(words)
	sc.words = words[:0]
	return ids
}

// Decode returns the text of ids exactly as Hugging Face's decode does:
// the tokens' strings through the decoder chain. skipSpecial drops special
// tokens. Ids without a token are dropped.
func (t *Tokenizer) Decode(ids []int, skipSpecial bool) string {
	toks := make([]string, 0, len(ids))
	for _, id := range ids {
		if id < 0 || id >= len(t.tokens) || !t.known[id] || (skipSpecial && t.special[id]) {
			continue
		}
		toks = append(toks, t.tokens[id])
	}
	if t.dec == nil {
		return strings.Join(toks, " ")
	}
	return strings.Join(t.dec.decodeChain(toks), "")
}

// Piece is the bytes token id adds to the text when it follows other
// tokens in a generated stream: the decoder chain's work on that one
// token, without what it does only at the start of the text (the Strip of
// a leading space, say). The bytes need not be whole UTF-8 (Stream
// assembles them). Ids without a token have no piece.
func (t *Tokenizer) Piece(id int) string {
	if id < 0 || id >= len(t.pieces) {
		return ""
	}
	return t.pieces[id]
}

// trie finds added tokens in text: at the leftmost position where any
// matches, the longest, as Hugging Face's Aho-Corasick search does.
type trie struct {
	root  [256]int32 // first byte -> node, 0 for none
	nodes []trieNode
	toks  []addedToken
}

type trieNode struct {
	edges []trieEdge
	tok   int32 // index into toks, -1 for none
}

type trieEdge struct {
	b  byte
	to int32
}

func newTrie(toks []addedToken) *trie {
	tr := &trie{nodes: []trieNode{{tok: -1}}, toks: toks}
	for i, a := range toks {
		cur := int32(-1)
		for j := range len(a.content) {
			c := a.content[j]
			var next int32
			if cur < 0 {
				next = tr.root[c]
			} else {
				for _, e := range tr.nodes[cur].edges {
					if e.b == c {
						next = e.to
					}
				}
			}
			if next == 0 {
				next = int32(len(tr.nodes))
				tr.nodes = append(tr.nodes, trieNode{tok: -1})
				if cur < 0 {
					tr.root[c] = next
				} else {
					tr.nodes[cur].edges = append(tr.nodes[cur].edges, trieEdge{c, next})
				}
			}
			cur = next
		}
		if tr.nodes[cur].tok < 0 {
			tr.nodes[cur].tok = int32(i)
		}
	}
	return tr
}

// longest returns the token that is the longest prefix of s, or -1.
func (tr *trie) longest(s string) (tok, n int) {
	tok = -1
	cur := tr.root[s[0]]
	for i := 1; cur != 0; i++ {
		if k := tr.nodes[cur].tok; k >= 0 {
			tok, n = int(k), i
		}
		if i >= len(s) {
			break
		}
		next := int32(0)
		for _, e := range tr.nodes[cur].edges {
			if e.b == s[i] {
				next = e.to
				break
			}
		}
		cur = next
	}
	return tok, n
}

// split cuts s at the added tokens it holds, calling fn in order for each
// stretch of text (id -1) and each token, with the byte offset it starts
// at. Tokens with lstrip or rstrip take the whitespace beside them, and
// single_word tokens match only between non-word characters, as in
// Hugging Face's added vocabulary.
func (tr *trie) split(s string, fn func(seg string, at int, id int)) {
	if len(tr.toks) == 0 {
		if s != "" {
			fn(s, 0, -1)
		}
		return
	}
	last := 0
	for i := 0; i < len(s); {
		if tr.root[s[i]] == 0 {
			i++
			continue
		}
		k, n := tr.longest(s[i:])
		if k < 0 {
			i++
			continue
		}
		start, stop := i, i+n
		i = stop
		a := tr.toks[k]
		if a.single && (startsWord(s[stop:]) || endsWord(s[:start])) {
			continue
		}
		if a.lstrip {
			start = max(len(strings.TrimRightFunc(s[:start], isWhite)), last)
		}
		if a.rstrip {
			stop = len(s) - len(strings.TrimLeftFunc(s[stop:], isWhite))
			i = stop
		}
		if last < start {
			fn(s[last:start], last, -1)
		}
		fn(s[start:stop], start, a.id)
		last = stop
	}
	if last < len(s) {
		fn(s[last:], last, -1)
	}
}

func startsWord(s string) bool {
	for _, r := range s {
		return isWordChar(r)
	}
	return false
}

func endsWord(s string) bool {
	r, n := utf8.DecodeLastRuneInString(s)
	return n > 0 && isWordChar(r)
}
