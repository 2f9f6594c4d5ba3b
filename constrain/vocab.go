package constrain

import (
	"fmt"
	"slices"
	"sync"
	"unicode/utf8"
)

// Vocab is a model's vocabulary as constrained decoding walks it: the
// pieces of its tokens in a trie, so that one walk from a State prunes at
// once every token that starts with a byte the State refuses, and the
// masks of the states met so far. Build one per model and share it: it is
// safe for concurrent use.
type Vocab struct {
	width  int
	pieces []string // by token id; "" for a token never allowed
	stop   []bool   // by token id: ends a sequence
	stops  []int32
	nodes  []trieNode
	edges  []trieEdge
	ids    []int32 // the tokens whose piece ends at a node, by node

	mu        sync.Mutex
	masks     map[string][]uint64
	maskBytes int
}

type trieNode struct {
	edges [2]int32 // edges[0]:edges[1] into Vocab.edges
	ids   [2]int32 // into Vocab.ids
}

type trieEdge struct {
	b     byte
	child int32
}

// maxMaskBytes bounds the masks a Vocab caches; past it the cache starts
// over. A mask is a bit per token: 16 KiB at a vocabulary of 128k.
const maxMaskBytes = 64 << 20

// NewVocab builds the vocabulary of width token ids (the width of the
// model's logits), whose pieces piece gives: the bytes each token adds
// to the text, and whether it ends the sequence. Tokens that add nothing
// and do not end it (special tokens) are never allowed. The vocabulary
// must be able to spell any JSON text one byte at a time, which byte-level
// vocabularies can.
func NewVocab(width int, piece func(id int) (string, bool)) (*Vocab, error) {
	v := &Vocab{width: width, pieces: make([]string, width), stop: make([]bool, width), masks: map[string][]uint64{}}
	var single [256]bool
	partial := false
	type entry struct {
		p  string
		id int32
	}
	var all []entry
	for id := range width {
		p, end := piece(id)
		switch {
		case end:
			v.stop[id] = true
			v.stops = append(v.stops, int32(id))
		case p != "":
			v.pieces[id] = p
			all = append(all, entry{p, int32(id)})
			if len(p) == 1 {
				single[p[0]] = true
			}
			if !utf8.FullRuneInString(p[lastRuneStart(p):]) {
				partial = true
			}
		}
	}
	if len(v.stops) == 0 {
		return nil, fmt.Errorf("the vocabulary has no token that ends a sequence")
	}
	for b := 0x20; b < 0xc0; b++ {
		if (b < 0x7f || partial && b >= 0x80) && !single[b] {
			return nil, fmt.Errorf("the vocabulary has no token for the byte %#02x alone, which constrained decoding needs", b)
		}
	}
	slices.SortFunc(all, func(a, b entry) int {
		if a.p < b.p {
			return -1
		} else if a.p > b.p {
			return 1
		}
		return int(a.id - b.id)
	})
	// Breadth first, so that each node's edges are consecutive.
	type span struct {
		lo, hi, depth int
		node          int32
	}
	v.nodes = append(v.nodes, trieNode{})
	queue := []span{{0, len(all), 0, 0}}
	for len(queue) > 0 {
		s := queue[0]
		queue = queue[1:]
		n := &v.nodes[s.node]
		lo := s.lo
		n.ids[0] = int32(len(v.ids))
		for lo < s.hi && len(all[lo].p) == s.depth {
			v.ids = append(v.ids, all[lo].id)
			lo++
		}
		n.ids[1] = int32(len(v.ids))
		n.edges[0] = int32(len(v.edges))
		for lo < s.hi {
			b := all[lo].p[s.depth]
			hi := lo
			for hi < s.hi && all[hi].p[s.depth] == b {
				hi++
			}
			child := int32(len(v.nodes))
			v.nodes = append(v.nodes, trieNode{})
			v.edges = append(v.edges, trieEdge{b, child})
			queue = append(queue, span{lo, hi, s.depth + 1, child})
			lo = hi
		}
		v.nodes[s.node].edges[1] = int32(len(v.edges))
	}
	return v, nil
}

// lastRuneStart is where the last UTF-8 sequence of p starts.
func lastRuneStart(p string) int {
	for i := len(p) - 1; i >= 0 && i >= len(p)-4; i-- {
		if utf8.RuneStart(p[i]) {
			return i
		}
	}
	return len(p) - 1
}

// Width is the number of token ids, the length of a mask in bits.
func (v *Vocab) Width() int { return v.width }

// Matcher follows one generation's text through a grammar and says which
// tokens may come next. It is not safe for concurrent use.
type Matcher struct {
	g   *Grammar
	v   *Vocab
	s   State
	key []byte
	buf []thread
	// last is the mask of the state whose threads are lastAt; inside a
	// string the state stays the same for many tokens.
	last   []uint64
	lastAt *thread
}

// NewMatcher starts a matcher of g's documents over v's tokens.
func NewMatcher(g *Grammar, v *Vocab) *Matcher {
	return &Matcher{g: g, v: v, s: g.Start()}
}

// Complete reports whether the text so far is a whole document.
func (m *Matcher) Complete() bool { return m.s.Complete() }

// Accept reads token id and reports whether it was allowed: a token that
// ends the sequence is allowed once the document is complete, any other
// while its piece keeps the text a valid prefix. A refused token leaves
// the matcher as it was.
func (m *Matcher) Accept(id int) bool {
	if id < 0 || id >= m.v.width {
		return false
	}
	if m.v.stop[id] {
		return m.s.Complete()
	}
	p := m.v.pieces[id]
	if p == "" {
		return false
	}
	s := m.s
	for i := 0; i < len(p) && !s.Dead(); i++ {
		s, m.buf = m.g.step(s, p[i], m.buf[:0])
	}
	if s.Dead() {
		return false
	}
	m.s = s
	return true
}

// Allowed is the mask of the tokens that may come next: bit id%64 of
// word id/64 is set when token id may. It is shared; the caller must not
// change it.
func (m *Matcher) Allowed() []uint64 {
	if len(m.s.threads) > 0 && m.lastAt == &m.s.threads[0] {
		return m.last
	}
	m.key = append(append(m.key[:0], m.g.key...), 0)
	m.key = m.s.appendKey(m.key)
	m.v.mu.Lock()
	mask, ok := m.v.masks[string(m.key)]
	m.v.mu.Unlock()
	if !ok {
		mask = m.v.mask(m.g, m.s)
		m.v.mu.Lock()
		if m.v.maskBytes += 8 * len(mask); m.v.maskBytes > maxMaskBytes {
			clear(m.v.masks)
			m.v.maskBytes = 8 * len(mask)
		}
		m.v.masks[string(m.key)] = mask
		m.v.mu.Unlock()
	}
	if len(m.s.threads) > 0 {
		m.last, m.lastAt = mask, &m.s.threads[0]
	}
	return mask
}

// mask computes the mask of state s by one walk of the trie.
func (v *Vocab) mask(g *Grammar, s State) []uint64 {
	mask := make([]uint64, (v.width+63)/64)
	if s.Complete() {
		for _, id := range v.stops {
			mask[id/64] |= 1 << (id % 64)
		}
		return mask
	}
	w := walker{v: v, g: g, mask: mask}
	w.walk(s, 0, 0)
	return mask
}

type walker struct {
	v    *Vocab
	g    *Grammar
	mask []uint64
	bufs [][]thread // scratch per depth
}

func (w *walker) walk(s State, node int32, depth int) {
	if depth == len(w.bufs) {
		w.bufs = append(w.bufs, nil)
	}
	n := w.v.nodes[node]
	for _, e := range w.v.edges[n.edges[0]:n.edges[1]] {
		next, buf := w.g.step(s, e.b, w.bufs[depth][:0])
		w.bufs[depth] = buf
		if next.Dead() {
			continue
		}
		c := w.v.nodes[e.child]
		for _, id := range w.v.ids[c.ids[0]:c.ids[1]] {
			w.mask[id/64] |= 1 << (id % 64)
		}
		if c.edges[1] > c.edges[0] {
			w.walk(next, e.child, depth+1)
		}
	}
}
