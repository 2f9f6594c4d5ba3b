package ort

import (
	"fmt"

	onnxrt "github.com/yalue/onnxruntime_go"

	"h3infer/workerconf"
)

// batch is the running sequences of one model that advance together: each
// decode step is one ONNX Runtime call over all of them, input_ids
// [rows, 1] and a KV cache [rows, heads, cols, head_dim] per layer.
//
// Rows are left-padded: row r's tokens fill the last n[r] of the cache's
// cols, and attention_mask is 0 over the padding. Each step appends one
// column for every row, so the cache never needs rewriting while rows
// only grow; a row whose prompt is longer than cols makes the whole cache
// wider once (relayout), and when the longest row leaves, the columns no
// row uses any more are cut away, so padding never outlives the row that
// caused it. Position ids count a row's own tokens, so padding changes no
// row's positions.
//
// The cache lives in Go memory as bytes of the model's own element type
// (float32, float16 or bfloat16), two buffers per past input: the step reads
// past from one and has the runtime write present, one column wider, into
// the other, which becomes the next past. Nothing is copied per step
// beyond what the model's own concatenation does.
//
// A model whose model.json says kv_cache "append" returns only the step's
// new positions as present, and the batch keeps the cache itself (the
// append layout). Rows are then right-padded in a buffer of cols columns,
// its capacity: row r's tokens fill its first n[r] columns, each step writes
// the new column at n[r], and every column goes to the model as past with
// the unused ones masked out. Nothing moves while rows grow, and the model
// reads the cache where it lies instead of copying it into present, which
// in the concat layout costs as much as the attention itself. Capacity
// grows with headroom (appendRoom), so the cache is rewritten once in many
// steps, and shrinks when the row that widened it leaves.
//
// Rows are numbered in the order they joined, except that a row leaving
// hands its number to the last row (leave); the caller keeps its own
// sequences in the same order.
type batch struct {
	m    *Model
	n    []int // tokens in each row's cache
	cols int
	// appendKV selects the append layout; fresh receives each step's new
	// positions, [rows, heads, 1, head_dim] per past input.
	appendKV bool
	fresh    [][]byte

	buf [2][][]byte // [which][past input], laid out [rows, heads, cols, head_dim]
	cur int         // buf[cur] holds the cache

	ids, pos, mask []int64
	logits         []float32 // float32 logits of a step, [rows, vocab]
	rawLogits      []byte    // half-precision logits of a step

	// With a device-resident cache (Model.dev, devicekv.go): the present
	// outputs of the last step, which hold the cache while the batch keeps
	// its shape; empty when buf[cur] holds it.
	onDevice []rawValue
	binding  *onnxrt.IoBinding
	// broken is a failure to move the cache off the device; the next step
	// returns it, which fails the batch's sequences.
	broken error
}

func (m *Model) newBatch() *batch {
	b := &batch{m: m, appendKV: m.cfg.KVCache == workerconf.KVAppend}
	if b.appendKV {
		b.fresh = make([][]byte, 2*m.layers)
	}
	for i := range b.buf {
		b.buf[i] = make([][]byte, 2*m.layers)
	}
	return b
}

// rowBytes is the size of one row of one past input at cols columns.
func (b *batch) rowBytes(cols int) int { return int(b.m.heads*b.m.headDim*b.m.kvSize) * cols }

// posBytes is the size of one head's entry for one position.
func (b *batch) posBytes() int { return int(b.m.headDim * b.m.kvSize) }

// grow returns s with room for n elements, keeping its contents when keep
// is set. Growth carries an eighth in hand so that a cache gaining a column
// a step reallocates rarely, without holding much beyond what it needs.
func grow[T any](s []T, n int, keep bool) []T {
	if cap(s) >= n {
		return s[:n]
	}
	t := make([]T, n, n+n/8+1024)
	if keep {
		copy(t, s)
	}
	return t
}

// join adds a row of n tokens with kv, its prefill cache laid out
// [heads, n, head_dim] per past input, as the last row.
func (b *batch) join(kv [][]byte, n int) {
	b.toHost()
	if b.appendKV && n >= b.cols {
		b.relayout(appendRoom(max(n, b.widest())))
	} else if !b.appendKV && n > b.cols {
		b.relayout(n)
	}
	r := len(b.n)
	hd := b.posBytes()
	heads := int(b.m.heads)
	pad := b.cols - n
	if b.appendKV {
		pad = 0 // tokens first; the columns after them are masked
	}
	for k, src := range kv {
		dst := grow(b.buf[b.cur][k], (r+1)*b.rowBytes(b.cols), true)
		b.buf[b.cur][k] = dst
		row := dst[r*b.rowBytes(b.cols):]
		for h := range heads {
			line := row[h*b.cols*hd : (h+1)*b.cols*hd]
			clear(line[:pad*hd])
			copy(line[pad*hd:], src[h*n*hd:(h+1)*n*hd])
		}
	}
	b.n = append(b.n, n)
}

// leave removes row r: the last row moves into its place. Columns that
// only r used are cut away.
func (b *batch) leave(r int) {
	last := len(b.n) - 1
	if r < 0 || r > last {
		return
	}
	b.toHost()
	if r != last {
		size := b.rowBytes(b.cols)
		for k := range b.buf[b.cur] {
			s := b.buf[b.cur][k]
			copy(s[r*size:(r+1)*size], s[last*size:(last+1)*size])
		}
		b.n[r] = b.n[last]
	}
	b.n = b.n[:last]
	if len(b.n) == 0 {
		// Give the memory back; an idle worker should not hold its peak.
		b.dropDevice()
		b.broken = nil
		b.cols = 0
		for i := range b.buf {
			clear(b.buf[i])
		}
		return
	}
	widest := b.widest()
	if b.appendKV && b.cols > appendRoom(widest)+appendHeadroom(widest) {
		b.relayout(appendRoom(widest))
	} else if !b.appendKV && widest < b.cols {
		b.relayout(widest)
	}
}

// widest is the longest row's length.
func (b *batch) widest() int {
	w := 0
	for _, n := range b.n {
		w = max(w, n)
	}
	return w
}

// appendRoom is the capacity an append-layout cache takes for rows of up
// to n tokens: room for the next token, and headroom so that the cache is
// rewritten once in appendHeadroom steps, not at each.
func appendRoom(n int) int { return n + 1 + appendHeadroom(n) }

// appendHeadroom is an eighth of n, at least 16 columns: the unused
// columns every step attends (masked) stay a small part of the work.
func appendHeadroom(n int) int { return max(16, n/8) }

// toHost brings a device-resident cache into buf[cur] before the batch
// changes shape.
func (b *batch) toHost() {
	if err := b.download(); err != nil && b.broken == nil {
		b.broken = err
	}
}

// relayout rewrites the cache with cols columns, each row keeping its
// tokens at the right end (at the left in the append layout). cols must be
// at least every row's n.
func (b *batch) relayout(cols int) {
	hd := b.posBytes()
	heads := int(b.m.heads)
	next := 1 - b.cur
	for k := range b.buf[b.cur] {
		src := b.buf[b.cur][k]
		dst := grow(b.buf[next][k], len(b.n)*b.rowBytes(cols), false)
		for r, n := range b.n {
			for h := range heads {
				line := dst[(r*heads+h)*cols*hd : (r*heads+h+1)*cols*hd]
				if b.appendKV {
					first := (r*heads + h) * b.cols * hd
					copy(line, src[first:first+n*hd])
					continue
				}
				from := src[((r*heads+h)*b.cols+b.cols-n)*hd : ((r*heads+h)*b.cols+b.cols)*hd]
				pad := cols - n
				clear(line[:pad*hd])
				copy(line[pad*hd:], from)
			}
		}
		b.buf[next][k] = dst
	}
	b.cur, b.cols = next, cols
}

// step feeds row r the token next[r], every row in one run, and returns
// the logits of every row, [rows, vocab] in float32, which stay valid
// until the next step.
func (b *batch) step(next []int) ([]float32, error) {
	rows := len(b.n)
	if len(next) != rows {
		return nil, fmt.Errorf("model %s: step of %d rows given %d tokens", b.m.name, rows, len(next))
	}
	if rows == 0 {
		return nil, nil
	}
	if b.broken != nil {
		err := b.broken
		b.broken = nil
		return nil, err
	}
	if b.m.dev != nil {
		return b.stepBound(next)
	}
	m := b.m
	if b.appendKV {
		if w := b.widest(); w >= b.cols {
			b.relayout(appendRoom(w))
		}
	}
	cols := b.cols + 1 // attention_mask's width, past and new
	b.stepInputs(cols, next)
	var vs values
	defer vs.destroy()
	inputs := make([]onnxrt.Value, 0, m.inputLen)
	one := onnxrt.NewShape(int64(rows), 1)
	if err := vs.add(&inputs, one, b.ids); err != nil {
		return nil, fmt.Errorf("model %s: step: input_ids: %w", m.name, err)
	}
	if err := vs.add(&inputs, onnxrt.NewShape(int64(rows), int64(cols)), b.mask); err != nil {
		return nil, fmt.Errorf("model %s: step: attention_mask: %w", m.name, err)
	}
	if m.hasPositions {
		if err := vs.add(&inputs, one, b.pos); err != nil {
			return nil, fmt.Errorf("model %s: step: position_ids: %w", m.name, err)
		}
	}
	past := onnxrt.NewShape(int64(rows), m.heads, int64(b.cols), m.headDim)
	for k := range b.buf[b.cur] {
		if err := vs.addRaw(&inputs, past, b.buf[b.cur][k][:rows*b.rowBytes(b.cols)], m.kvType); err != nil {
			return nil, fmt.Errorf("model %s: step: past %d: %w", m.name, k, err)
		}
	}
	outputs := make([]onnxrt.Value, 0, m.outputLen)
	if m.vocab > 0 {
		var err error
		if m.logitsType == onnxrt.TensorElementDataTypeFloat {
			b.logits = grow(b.logits, rows*int(m.vocab), false)
			err = vs.add(&outputs, onnxrt.NewShape(int64(rows), 1, m.vocab), b.logits)
		} else {
			b.rawLogits = grow(b.rawLogits, rows*int(m.vocab)*2, false)
			err = vs.addRaw(&outputs, onnxrt.NewShape(int64(rows), 1, m.vocab), b.rawLogits, m.logitsType)
		}
		if err != nil {
			return nil, fmt.Errorf("model %s: step: logits: %w", m.name, err)
		}
	} else {
		outputs = append(outputs, nil)
	}
	to := 1 - b.cur
	present := onnxrt.NewShape(int64(rows), m.heads, int64(cols), m.headDim)
	dst := b.buf[to]
	if b.appendKV {
		to, cols = b.cur, b.cols // the cache stays where it is
		present = onnxrt.NewShape(int64(rows), m.heads, 1, m.headDim)
		dst = b.fresh
	}
	for k := range dst {
		dst[k] = grow(dst[k], int(present.FlattenedSize()*m.kvSize), false)
		if err := vs.addRaw(&outputs, present, dst[k], m.kvType); err != nil {
			return nil, fmt.Errorf("model %s: step: present %d: %w", m.name, k, err)
		}
	}
	if err := m.session.Run(inputs, outputs); err != nil {
		if m.vocab == 0 && outputs[0] != nil {
			outputs[0].Destroy()
		}
		return nil, fmt.Errorf("model %s: decode step of %d rows over %d columns: %w", m.name, rows, b.cols, err)
	}
	if b.appendKV {
		b.keepFresh()
	}
	all := b.logits
	if m.vocab == 0 {
		vs.owned = append(vs.owned, outputs[0])
		t, ok := outputs[0].(*onnxrt.Tensor[float32])
		shape := outputs[0].GetShape()
		if !ok || len(shape) != 3 || shape[0] != int64(rows) || shape[1] != 1 || shape[2] <= 0 {
			return nil, fmt.Errorf("model %s: logits: want float32 [%d, 1, vocab], got %T %v", m.name, rows, outputs[0], shape)
		}
		all = t.GetData()
	}
	switch {
	case m.logitsType != onnxrt.TensorElementDataTypeFloat:
		b.logits = grow(b.logits, rows*int(m.vocab), false)
		widen(b.logits, b.rawLogits, m.logitsType == onnxrt.TensorElementDataTypeBFloat16)
	case m.vocab == 0:
		// The runtime's own output goes with vs.
		b.logits = append(b.logits[:0], all...)
	}
	for r := range b.n {
		b.n[r]++
	}
	b.cur, b.cols = to, cols
	return b.logits, nil
}

// keepFresh writes a step's new positions (b.fresh) into the append
// layout's cache, each row's at its column n, before n counts them.
func (b *batch) keepFresh() {
	hd := b.posBytes()
	heads := int(b.m.heads)
	for k, src := range b.fresh {
		cache := b.buf[b.cur][k]
		for r, n := range b.n {
			for h := range heads {
				line := (r*heads + h) * hd
				copy(cache[((r*heads+h)*b.cols+n)*hd:], src[line:line+hd])
			}
		}
	}
}

// stepInputs fills ids, pos and mask for a step to cols columns, the
// cache's and the new token's, feeding row r the token next[r].
func (b *batch) stepInputs(cols int, next []int) {
	b.ids = b.ids[:0]
	b.pos = b.pos[:0]
	b.mask = b.mask[:0]
	for r, n := range b.n {
		b.ids = append(b.ids, int64(next[r]))
		b.pos = append(b.pos, int64(n))
		for c := range cols {
			if b.appendKV {
				var v int64
				if c < n || c == b.cols {
					v = 1
				}
				b.mask = append(b.mask, v)
				continue
			}
			if c >= b.cols-n {
				b.mask = append(b.mask, 1)
			} else {
				b.mask = append(b.mask, 0)
			}
		}
	}
}

// kvBytesPerToken is the KV cache one token of one sequence takes.
func (m *Model) kvBytesPerToken() int64 { return 2 * int64(m.layers) * m.heads * m.headDim * m.kvSize }

// KVBytes bounds the memory of a batch's cache, both buffers, if it held
// rows sequences up to longest tokens each.
func (m *Model) KVBytes(rows, longest int) int64 {
	if m.cfg.KVCache == workerconf.KVAppend {
		longest = appendRoom(longest)
	}
	return 2 * int64(rows) * int64(longest) * m.kvBytesPerToken()
}

// close drops the rows' caches.
func (b *batch) close() {
	b.n = b.n[:0]
	b.cols = 0
	for i := range b.buf {
		clear(b.buf[i])
	}
	b.dropDevice()
	b.broken = nil
	if b.binding != nil {
		b.binding.Destroy()
		b.binding = nil
	}
}
