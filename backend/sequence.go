package backend

import (
	"errors"
	"fmt"

	ort "github.com/yalue/onnxruntime_go"
)

// sequence is one running forward pass state of a model: the KV cache of
// every token fed so far. Each call to forward feeds only the new tokens;
// the present.* outputs become the next call's past_key_values inputs, so
// the prefix is never recomputed. A sequence is used by one goroutine at a
// time.
type sequence struct {
	m    *Model
	past []ort.Value // key, value per layer, each [1, heads, n, head_dim]
	n    int         // tokens in the cache
}

func (m *Model) newSequence() (*sequence, error) {
	s := &sequence{m: m, past: make([]ort.Value, 0, 2*m.layers)}
	for range 2 * m.layers {
		t, err := ort.NewTensor(ort.NewShape(1, m.heads, 0, m.headDim), []float32{})
		if err != nil {
			s.close()
			return nil, fmt.Errorf("model %s: empty KV cache: %w", m.name, err)
		}
		s.past = append(s.past, t)
	}
	return s, nil
}

// forward feeds ids after the cached tokens and returns the logits of the
// last one. The returned slice is the caller's.
func (s *sequence) forward(ids []int) ([]float32, error) {
	if len(ids) == 0 {
		return nil, errors.New("forward: no tokens")
	}
	total := s.n + len(ids)
	idData := make([]int64, len(ids))
	posData := make([]int64, len(ids))
	for i, id := range ids {
		idData[i] = int64(id)
		posData[i] = int64(s.n + i)
	}
	mask := make([]int64, total)
	for i := range mask {
		mask[i] = 1
	}
	var owned []ort.Value
	defer func() {
		for _, v := range owned {
			v.Destroy()
		}
	}()
	newTensor := func(shape ort.Shape, data []int64) (ort.Value, error) {
		t, err := ort.NewTensor(shape, data)
		if err != nil {
			return nil, err
		}
		owned = append(owned, t)
		return t, nil
	}
	inputs := make([]ort.Value, 0, s.m.inputLen)
	step := ort.NewShape(1, int64(len(ids)))
	in, err := newTensor(step, idData)
	if err != nil {
		return nil, fmt.Errorf("forward: input_ids: %w", err)
	}
	inputs = append(inputs, in)
	if in, err = newTensor(ort.NewShape(1, int64(total)), mask); err != nil {
		return nil, fmt.Errorf("forward: attention_mask: %w", err)
	}
	inputs = append(inputs, in)
	if s.m.hasPositions {
		if in, err = newTensor(step, posData); err != nil {
			return nil, fmt.Errorf("forward: position_ids: %w", err)
		}
		inputs = append(inputs, in)
	}
	inputs = append(inputs, s.past...)

	outputs := make([]ort.Value, s.m.outputLen) // nil: allocated by the run
	if err := s.m.session.Run(inputs, outputs); err != nil {
		for _, v := range outputs {
			if v != nil {
				v.Destroy()
			}
		}
		return nil, fmt.Errorf("model %s: run %d tokens after %d: %w", s.m.name, len(ids), s.n, err)
	}
	owned = append(owned, outputs[0])
	logits, ok := outputs[0].(*ort.Tensor[float32])
	shape := outputs[0].GetShape()
	if !ok || len(shape) != 3 || shape[0] != 1 || shape[1] != int64(len(ids)) || shape[2] <= 0 {
		owned = append(owned, outputs[1:]...)
		return nil, fmt.Errorf("model %s: logits: want float32 [1, %d, vocab], got %T %v", s.m.name, len(ids), outputs[0], shape)
	}
	vocab := int(shape[2])
	last := make([]float32, vocab)
	copy(last, logits.GetData()[(len(ids)-1)*vocab:])

	for i, v := range outputs[1:] {
		if d := v.GetShape(); len(d) != 4 || d[2] != int64(total) {
			owned = append(owned, outputs[1:]...)
			return nil, fmt.Errorf("model %s: present value %d: want [1, heads, %d, head_dim], got %v", s.m.name, i, total, d)
		}
	}
	// The old cache is replaced by the presents, which include it.
	owned = append(owned, s.past...)
	copy(s.past, outputs[1:])
	s.n = total
	return last, nil
}

// close releases the KV cache.
func (s *sequence) close() {
	for _, v := range s.past {
		v.Destroy()
	}
	s.past = nil
}
