package tokenize

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Tokenizer is a byte-level BPE tokenizer read from a Hugging Face
// tokenizer.json. It is immutable after loading and safe for concurrent use.
//
// Encoding first splits out added tokens (their content is matched verbatim
// anywhere in the text, longest first, as Hugging Face does by default),
// then splits the rest into words with the GPT-2 pre-tokenization rule
// (see splitWords), maps each word's bytes to the GPT-2 byte alphabet and
// merges symbol pairs by rank. Because every byte has a vocabulary entry
// (checked at load), encoding never fails and decoding restores the exact
// bytes.
type Tokenizer struct {
	vocab   map[string]int
	ranks   map[[2]string]int
	pieces  []string // token id -> the bytes it decodes to
	added   []addedToken
	byteSym [256]string // byte -> its one-rune symbol in the vocabulary
	split   bool        // pre-tokenize with the GPT-2 rule
}

type addedToken struct {
	id      int
	content string
	special bool
}

// tokenizerJSON is the part of tokenizer.json that byte-level BPE needs.
// The format belongs to another project and carries many fields we do not
// use, so unknown keys are ignored here; what we do use is validated.
type tokenizerJSON struct {
	AddedTokens []struct {
		ID      int    `json:"id"`
		Content string `json:"content"`
		Special bool   `json:"special"`
	} `json:"added_tokens"`
	Normalizer   json.RawMessage `json:"normalizer"`
	PreTokenizer *struct {
		Type           string `json:"type"`
		AddPrefixSpace bool   `json:"add_prefix_space"`
		UseRegex       *bool  `json:"use_regex"`
	} `json:"pre_tokenizer"`
	Model struct {
		Type         string            `json:"type"`
		Vocab        map[string]int    `json:"vocab"`
		Merges       []json.RawMessage `json:"merges"`
		ByteFallback bool              `json:"byte_fallback"`
	} `json:"model"`
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

// Parse decodes and validates tokenizer.json content.
func Parse(data []byte) (*Tokenizer, error) {
	var f tokenizerJSON
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("decode tokenizer.json: %w", err)
	}
	var errs []error
	if f.Model.Type != "BPE" {
		errs = append(errs, fmt.Errorf("model.type: only \"BPE\" is supported, got %q", f.Model.Type))
	}
	if n := strings.TrimSpace(string(f.Normalizer)); n != "" && n != "null" {
		errs = append(errs, errors.New("normalizer: must be null; normalizers are not supported"))
	}
	t := &Tokenizer{vocab: f.Model.Vocab, ranks: make(map[[2]string]int, len(f.Model.Merges))}
	switch {
	case f.PreTokenizer == nil:
		errs = append(errs, errors.New("pre_tokenizer: must be ByteLevel, got null"))
	case f.PreTokenizer.Type != "ByteLevel":
		errs = append(errs, fmt.Errorf("pre_tokenizer.type: only \"ByteLevel\" is supported, got %q", f.PreTokenizer.Type))
	case f.PreTokenizer.AddPrefixSpace:
		errs = append(errs, errors.New("pre_tokenizer.add_prefix_space: true is not supported"))
	default:
		t.split = f.PreTokenizer.UseRegex == nil || *f.PreTokenizer.UseRegex
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}

	maxID := -1
	for tok, id := range t.vocab {
		if id < 0 {
			errs = append(errs, fmt.Errorf("model.vocab: token %q has negative id %d", tok, id))
		}
		maxID = max(maxID, id)
	}
	for _, a := range f.AddedTokens {
		if a.Content == "" {
			errs = append(errs, fmt.Errorf("added_tokens: id %d has empty content", a.ID))
			continue
		}
		if a.ID < 0 {
			errs = append(errs, fmt.Errorf("added_tokens: %q has negative id %d", a.Content, a.ID))
			continue
		}
		t.added = append(t.added, addedToken{id: a.ID, content: a.Content, special: a.Special})
		maxID = max(maxID, a.ID)
	}
	// Ids index a table, so they must be close to dense; real vocabularies
	// are, and a stray huge id must not allocate gigabytes.
	if limit := len(t.vocab) + len(f.AddedTokens) + maxIDGap; maxID >= limit {
		errs = append(errs, fmt.Errorf("token ids: largest is %d, want below %d (vocabulary size plus %d)", maxID, limit, maxIDGap))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	// Longest first, so that at one position the longest added token wins.
	sort.SliceStable(t.added, func(i, j int) bool { return len(t.added[i].content) > len(t.added[j].content) })

	symByte := make(map[rune]byte, 256)
	for b, r := range byteAlphabet() {
		t.byteSym[b] = string(r)
		symByte[r] = byte(b)
		if _, ok := t.vocab[string(r)]; !ok {
			errs = append(errs, fmt.Errorf("model.vocab: missing the byte-level symbol %q for byte 0x%02x", string(r), b))
		}
	}
	t.pieces = make([]string, maxID+1)
	set := make([]bool, maxID+1) // ids given a piece so far
	for tok, id := range t.vocab {
		b := make([]byte, 0, len(tok))
		for _, r := range tok {
			c, ok := symByte[r]
			if !ok {
				errs = append(errs, fmt.Errorf("model.vocab: token %q has %q outside the byte-level alphabet", tok, r))
				break
			}
			b = append(b, c)
		}
		if set[id] && t.pieces[id] != string(b) {
			errs = append(errs, fmt.Errorf("model.vocab: id %d is used by two tokens", id))
		}
		t.pieces[id], set[id] = string(b), true
	}
	for _, a := range t.added {
		if p := t.pieces[a.id]; set[a.id] && p != a.content {
			if v, ok := t.vocab[a.content]; !ok || v != a.id {
				errs = append(errs, fmt.Errorf("added_tokens: %q has id %d, which the vocabulary gives to another token", a.content, a.id))
			}
		}
		t.pieces[a.id], set[a.id] = a.content, true
	}
	for i, raw := range f.Model.Merges {
		pair, err := parseMerge(raw)
		if err != nil {
			errs = append(errs, fmt.Errorf("model.merges[%d]: %w", i, err))
			continue
		}
		if _, ok := t.vocab[pair[0]+pair[1]]; !ok {
			errs = append(errs, fmt.Errorf("model.merges[%d]: result %q is not in the vocabulary", i, pair[0]+pair[1]))
			continue
		}
		if _, dup := t.ranks[pair]; !dup {
			t.ranks[pair] = i
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return t, nil
}

// parseMerge accepts both spellings of a merge: "a b" and ["a","b"].
func parseMerge(raw json.RawMessage) ([2]string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		a, b, ok := strings.Cut(s, " ")
		if !ok || a == "" || b == "" || strings.Contains(b, " ") {
			return [2]string{}, fmt.Errorf("want \"left right\", got %q", s)
		}
		return [2]string{a, b}, nil
	}
	var pair []string
	if err := json.Unmarshal(raw, &pair); err != nil || len(pair) != 2 || pair[0] == "" || pair[1] == "" {
		return [2]string{}, fmt.Errorf("want a string or a pair of strings, got %s", raw)
	}
	return [2]string{pair[0], pair[1]}, nil
}

// byteAlphabet is GPT-2's reversible map from bytes to printable runes:
// printable Latin-1 bytes stand for themselves, the rest are shifted past
// 255 in order, so that no token string contains whitespace or controls.
func byteAlphabet() [256]rune {
	var m [256]rune
	n := 0
	for b := range 256 {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			m[b] = rune(b)
		} else {
			m[b] = rune(256 + n)
			n++
		}
	}
	return m
}

// VocabSize is one past the largest token id.
func (t *Tokenizer) VocabSize() int { return len(t.pieces) }

// TokenID returns the id of a token written as text: an added token's
// content or a vocabulary entry.
func (t *Tokenizer) TokenID(s string) (int, bool) {
	for _, a := range t.added {
		if a.content == s {
			return a.id, true
		}
	}
	id, ok := t.vocab[s]
	return id, ok
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

// Encode turns text into token ids.
func (t *Tokenizer) Encode(text string) []int {
	var ids []int
	for text != "" {
		pos, a := t.nextAdded(text)
		if pos < 0 {
			return t.encodeOrdinary(text, ids)
		}
		ids = t.encodeOrdinary(text[:pos], ids)
		ids = append(ids, a.id)
		text = text[pos+len(a.content):]
	}
	return ids
}

// nextAdded finds the earliest added token in text, the longest at a tie.
func (t *Tokenizer) nextAdded(text string) (int, addedToken) {
	best, bestTok := -1, addedToken{}
	for _, a := range t.added {
		i := strings.Index(text, a.content)
		if i >= 0 && (best < 0 || i < best) {
			best, bestTok = i, a
		}
	}
	return best, bestTok
}

func (t *Tokenizer) encodeOrdinary(text string, ids []int) []int {
	if !t.split {
		return t.encodeWord(text, ids)
	}
	for w := range splitWords(text) {
		ids = t.encodeWord(w, ids)
	}
	return ids
}

// encodeWord applies the merges to one pre-tokenized word: repeatedly merge
// the adjacent pair with the lowest rank, leftmost first.
func (t *Tokenizer) encodeWord(w string, ids []int) []int {
	if w == "" {
		return ids
	}
	syms := make([]string, len(w))
	for i := range len(w) {
		syms[i] = t.byteSym[w[i]]
	}
	for len(syms) > 1 {
		best, at := -1, -1
		for i := 0; i+1 < len(syms); i++ {
			if r, ok := t.ranks[[2]string{syms[i], syms[i+1]}]; ok && (best < 0 || r < best) {
				best, at = r, i
			}
		}
		if at < 0 {
			break
		}
		syms[at] += syms[at+1]
		syms = slices.Delete(syms, at+1, at+2)
	}
	for _, s := range syms {
		ids = append(ids, t.vocab[s])
	}
	return ids
}

// Decode returns the bytes of ids, added tokens included. Ids outside the
// vocabulary (a model may pad its output layer) decode to nothing.
func (t *Tokenizer) Decode(ids []int) []byte {
	var b []byte
	for _, id := range ids {
		b = append(b, t.Piece(id)...)
	}
	return b
}

// Piece is the bytes token id decodes to, which need not be whole UTF-8
// (Stream assembles them). Ids outside the vocabulary decode to nothing.
func (t *Tokenizer) Piece(id int) string {
	if id < 0 || id >= len(t.pieces) {
		return ""
	}
	return t.pieces[id]
}

// splitWords splits text into pre-tokenization words by the GPT-2 rule,
// hand-written because Go's regexp lacks the look-ahead the rule needs:
//
//	's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//
// \s is unicode.IsSpace, \p{L} unicode.IsLetter, \p{N} unicode.IsNumber.
// Invalid UTF-8 bytes count as "other" characters. The words concatenate to
// text exactly.
func splitWords(text string) func(yield func(string) bool) {
	return func(yield func(string) bool) {
		for len(text) > 0 {
			n := wordLen(text)
			if !yield(text[:n]) {
				return
			}
			text = text[n:]
		}
	}
}

const (
	classSpace = iota
	classLetter
	classNumber
	classOther
)

func runeClass(r rune) int {
	switch {
	case unicode.IsSpace(r):
		return classSpace
	case unicode.IsLetter(r):
		return classLetter
	case unicode.IsNumber(r):
		return classNumber
	}
	return classOther
}

// wordLen is the length in bytes of the word that starts text.
func wordLen(text string) int {
	if text[0] == '\'' {
		for _, c := range [...]string{"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"} {
			if strings.HasPrefix(text, c) {
				return len(c)
			}
		}
	}
	r, size := utf8.DecodeRuneInString(text)
	class := runeClass(r)
	start := 0
	if r == ' ' && size < len(text) {
		next, nsize := utf8.DecodeRuneInString(text[size:])
		if c := runeClass(next); c != classSpace {
			class, start = c, size+nsize
		}
	}
	if class != classSpace {
		if start == 0 {
			start = size
		}
		return start + runLen(text[start:], class)
	}
	end := size + runLen(text[size:], classSpace)
	if end == len(text) || end == size {
		return end
	}
	// Whitespace before a non-space: leave its last rune to start the next
	// word, as \s+(?!\S) backtracks by one.
	_, last := utf8.DecodeLastRuneInString(text[:end])
	return end - last
}

// runLen is the length of the prefix of s whose runes are all of class.
func runLen(s string, class int) int {
	for i, r := range s {
		if runeClass(r) != class {
			return i
		}
	}
	return len(s)
}
