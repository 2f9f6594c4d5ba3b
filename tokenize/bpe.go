package tokenize

import (
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"unicode/utf8"
)

// bpe is the BPE model: it turns one pre-tokenized word into token ids by
// spelling the word in single characters and then merging adjacent pairs,
// lowest merge rank first and leftmost at a tie, exactly as Hugging Face's
// BPE does.
type bpe struct {
	vocab  map[string]int
	merges map[uint64]merge // pair key (left id, right id) -> merge

	unk          int // -1 without an unknown token
	fuseUnk      bool
	byteFallback bool
	byteIDs      [256]int // <0xNN> token ids when byteFallback, -1 if absent
	ignoreMerges bool
	prefix       string // continuing_subword_prefix
	suffix       string // end_of_word_suffix

	cache wordCache
}

type merge struct {
	rank int32
	id   int32
}

func pairKey(a, b int) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

type bpeJSON struct {
	Type                    string   `json:"type"`
	Dropout                 *float64 `json:"dropout"`
	UnkToken                *string  `json:"unk_token"`
	ContinuingSubwordPrefix *string  `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string  `json:"end_of_word_suffix"`
	FuseUnk                 bool     `json:"fuse_unk"`
	ByteFallback            bool     `json:"byte_fallback"`
	IgnoreMerges            bool     `json:"ignore_merges"`
}

// parseBPE reads the model object. Its vocab and merges are read by hand
// (see jsonscan.go); the other members by encoding/json.
func parseBPE(data []byte) (*bpe, error) {
	fields, err := objectFields(data)
	if err != nil {
		return nil, fmt.Errorf("model: %w", err)
	}
	small := map[string]json.RawMessage{}
	for k, v := range fields {
		if k != "vocab" && k != "merges" {
			small[k] = v
		}
	}
	raw, _ := json.Marshal(small)
	var cfg bpeJSON
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return nil, fmt.Errorf("model: %w", err)
	}
	if cfg.Type != "BPE" {
		return nil, fmt.Errorf("model.type: %q is not supported; only \"BPE\" is", cfg.Type)
	}
	var errs []error
	if cfg.Dropout != nil {
		errs = append(errs, fmt.Errorf("model.dropout: must be null, got %v", *cfg.Dropout))
	}
	m := &bpe{
		unk:          -1,
		fuseUnk:      cfg.FuseUnk,
		byteFallback: cfg.ByteFallback,
		ignoreMerges: cfg.IgnoreMerges,
	}
	if cfg.ContinuingSubwordPrefix != nil {
		m.prefix = *cfg.ContinuingSubwordPrefix
	}
	if cfg.EndOfWordSuffix != nil {
		m.suffix = *cfg.EndOfWordSuffix
	}
	if v, ok := fields["vocab"]; !ok {
		errs = append(errs, errors.New("model.vocab: missing"))
	} else if m.vocab, err = readVocab(v); err != nil {
		errs = append(errs, fmt.Errorf("model.vocab: %w", err))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if cfg.UnkToken != nil {
		id, ok := m.vocab[*cfg.UnkToken]
		if !ok {
			errs = append(errs, fmt.Errorf("model.unk_token: %q is not in the vocabulary", *cfg.UnkToken))
		}
		m.unk = id
	}
	for b := range 256 {
		m.byteIDs[b] = -1
		if id, ok := m.vocab[fmt.Sprintf("<0x%02X>", b)]; ok {
			m.byteIDs[b] = id
		}
	}
	if v, ok := fields["merges"]; ok {
		m.merges = make(map[uint64]merge, len(v)/24)
		var buf []byte
		err := readMerges(v, func(i int, a, b []byte) error {
			ia, oka := m.vocab[string(a)]
			ib, okb := m.vocab[string(b)]
			if !oka || !okb {
				return fmt.Errorf("[%d]: %q or %q is not in the vocabulary", i, a, b)
			}
			buf = append(append(buf[:0], a...), b...)
			if m.prefix != "" && len(b) >= len(m.prefix) && string(b[:len(m.prefix)]) == m.prefix {
				buf = append(append(buf[:0], a...), b[len(m.prefix):]...)
			}
			id, ok := m.vocab[string(buf)]
			if !ok {
				return fmt.Errorf("[%d]: result %q is not in the vocabulary", i, buf)
			}
			// A repeated pair takes its last rank, as Hugging Face's map does.
			m.merges[pairKey(ia, ib)] = merge{rank: int32(i), id: int32(id)}
			return nil
		})
		if err != nil {
			// readMerges's errors start with the merge's index.
			errs = append(errs, fmt.Errorf("model.merges%w", err))
		}
	}
	return m, errors.Join(errs...)
}

// wordCache remembers the ids of words already encoded. Like Hugging
// Face's, it stops taking words when full rather than evicting.
type wordCache struct {
	mu    sync.RWMutex
	words map[string][]int32
}

const (
	cacheWords   = 1 << 16
	cacheWordLen = 256 // longer words are rare enough not to be worth keeping
)

func (c *wordCache) get(w string) ([]int32, bool) {
	c.mu.RLock()
	ids, ok := c.words[w]
	c.mu.RUnlock()
	return ids, ok
}

func (c *wordCache) put(w string, ids []int32) {
	if len(w) > cacheWordLen {
		return
	}
	c.mu.Lock()
	if c.words == nil {
		c.words = make(map[string][]int32)
	}
	if len(c.words) < cacheWords {
		c.words[w] = ids
	}
	c.mu.Unlock()
}

// encode appends the ids of word w, using s for scratch.
func (m *bpe) encode(w string, ids []int, s *symbols) []int {
	if w == "" {
		return ids
	}
	if m.ignoreMerges {
		if id, ok := m.vocab[w]; ok {
			return append(ids, id)
		}
	}
	if cached, ok := m.cache.get(w); ok {
		return appendIDs(ids, cached)
	}
	return appendIDs(ids, m.merge(w, s))
}

// encodeBytes is encode for a word in a scratch buffer, which is copied
// only when the word is not in the cache.
func (m *bpe) encodeBytes(w []byte, ids []int, s *symbols) []int {
	if len(w) == 0 {
		return ids
	}
	if m.ignoreMerges {
		if id, ok := m.vocab[string(w)]; ok {
			return append(ids, id)
		}
	}
	m.cache.mu.RLock()
	cached, ok := m.cache.words[string(w)]
	m.cache.mu.RUnlock()
	if ok {
		return appendIDs(ids, cached)
	}
	return appendIDs(ids, m.merge(string(w), s))
}

func appendIDs(ids []int, from []int32) []int {
	for _, id := range from {
		ids = append(ids, int(id))
	}
	return ids
}

// merge spells w, merges it and caches the result.
func (m *bpe) merge(w string, s *symbols) []int32 {
	m.spell(w, s)
	s.mergeAll(m.merges)
	out := make([]int32, 0, len(s.syms))
	for i := 0; i >= 0 && i < len(s.syms); i = int(s.syms[i].next) {
		out = append(out, s.syms[i].id)
	}
	m.cache.put(w, out)
	return out
}

// spell splits w into its first symbols: one per character, with the
// subword prefix and word suffix where configured, falling back to byte
// tokens or the unknown token for characters outside the vocabulary.
func (m *bpe) spell(w string, s *symbols) {
	s.syms = s.syms[:0]
	unk := -1
	var buf []byte
	for i := 0; i < len(w); {
		_, n := utf8.DecodeRuneInString(w[i:])
		ch := w[i : i+n]
		first, last := i == 0, i+n == len(w)
		i += n
		if (!first && m.prefix != "") || (last && m.suffix != "") {
			buf = buf[:0]
			if !first {
				buf = append(buf, m.prefix...)
			}
			buf = append(buf, ch...)
			if last {
				buf = append(buf, m.suffix...)
			}
			ch = string(buf)
		}
		if id, ok := m.vocab[ch]; ok {
			if unk >= 0 {
				s.add(m.unk)
				unk = -1
			}
			s.add(id)
			continue
		}
		if m.byteFallback && m.hasBytes(ch) {
			// Hugging Face adds the bytes without first flushing a pending
			// unknown token; so do we.
			for j := range len(ch) {
				s.add(m.byteIDs[ch[j]])
			}
			continue
		}
		if m.unk >= 0 {
			if unk >= 0 && !m.fuseUnk {
				s.add(m.unk)
			}
			unk = m.unk
		}
	}
	if unk >= 0 {
		s.add(m.unk)
	}
}

func (m *bpe) hasBytes(s string) bool {
	for i := range len(s) {
		if m.byteIDs[s[i]] < 0 {
			return false
		}
	}
	return true
}

// symbols is a word being merged: a doubly linked list over a slice, so
// that a merge is O(1) and the whole word O(n log n) with the heap.
type symbols struct {
	syms []symbol
	heap []pending
}

type symbol struct {
	id         int32
	prev, next int32
	gone       bool
}

type pending struct {
	rank int32
	pos  int32
	id   int32
}

func (s *symbols) add(id int) {
	n := int32(len(s.syms))
	next := n + 1
	s.syms = append(s.syms, symbol{id: int32(id), prev: n - 1, next: next})
}

func (s *symbols) mergeAll(merges map[uint64]merge) {
	if len(s.syms) == 0 {
		return
	}
	s.syms[len(s.syms)-1].next = -1
	s.heap = s.heap[:0]
	for i := 0; i+1 < len(s.syms); i++ {
		if mg, ok := merges[pairKey(int(s.syms[i].id), int(s.syms[i+1].id))]; ok {
			s.heap = append(s.heap, pending{rank: mg.rank, pos: int32(i), id: mg.id})
		}
	}
	// heapify
	for i := len(s.heap)/2 - 1; i >= 0; i-- {
		s.down(i)
	}
	for len(s.heap) > 0 {
		top := s.pop()
		cur := &s.syms[top.pos]
		if cur.gone || cur.next < 0 {
			continue
		}
		right := s.syms[cur.next]
		// Skip entries made stale by an earlier merge.
		if mg, ok := merges[pairKey(int(cur.id), int(right.id))]; !ok || mg.id != top.id {
			continue
		}
		cur.id = top.id
		s.syms[cur.next].gone = true
		cur.next = right.next
		if right.next >= 0 {
			s.syms[right.next].prev = top.pos
		}
		if cur.prev >= 0 {
			if mg, ok := merges[pairKey(int(s.syms[cur.prev].id), int(cur.id))]; ok {
				s.push(pending{rank: mg.rank, pos: cur.prev, id: mg.id})
			}
		}
		if cur.next >= 0 {
			if mg, ok := merges[pairKey(int(cur.id), int(s.syms[cur.next].id))]; ok {
				s.push(pending{rank: mg.rank, pos: top.pos, id: mg.id})
			}
		}
	}
}

func less(a, b pending) bool {
	if a.rank != b.rank {
		return a.rank < b.rank
	}
	return a.pos < b.pos
}

func (s *symbols) push(p pending) {
	s.heap = append(s.heap, p)
	i := len(s.heap) - 1
	for i > 0 {
		parent := (i - 1) / 2
		if !less(s.heap[i], s.heap[parent]) {
			break
		}
		s.heap[i], s.heap[parent] = s.heap[parent], s.heap[i]
		i = parent
	}
}

func (s *symbols) pop() pending {
	top := s.heap[0]
	last := len(s.heap) - 1
	s.heap[0] = s.heap[last]
	s.heap = s.heap[:last]
	s.down(0)
	return top
}

func (s *symbols) down(i int) {
	n := len(s.heap)
	for {
		l := 2*i + 1
		if l >= n {
			return
		}
		small := l
		if r := l + 1; r < n && less(s.heap[r], s.heap[l]) {
			small = r
		}
		if !less(s.heap[small], s.heap[i]) {
			return
		}
		s.heap[i], s.heap[small] = s.heap[small], s.heap[i]
		i = small
	}
}
