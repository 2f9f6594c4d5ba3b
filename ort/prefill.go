package ort

import (
	"errors"
	"fmt"

	onnxrt "github.com/yalue/onnxruntime_go"
)

// Prefill runs a whole prompt through the model from an empty cache, as a
// batch of one, and returns the logits of its last position and its KV
// cache, which Join takes: one slice per past_key_values input, each laid
// out [heads, len(ids), head_dim]. It touches nothing of the batch, so it
// may run while Step does.
//
// Prefill is its own call rather than rows padded into the decode step: a
// prompt is many tokens and a decode row is one, so padding prompts into
// the step would make every running sequence pay for the longest new
// prompt, and the step's input shape would change with each arrival. Alone,
// a prompt computes the same whether it then runs alone or batched. The
// cost is that running sequences wait for the prefills admitted before a
// step, which the generation loop bounds per step.
//
// Outputs are preallocated in Go memory: letting onnxruntime_go allocate
// them copies every output once more.
func (m *Model) Prefill(ids []int) (logits []float32, kv [][]byte, err error) {
	if len(ids) == 0 {
		return nil, nil, errors.New("prefill: no tokens")
	}
	n := int64(len(ids))
	idData := make([]int64, n)
	posData := make([]int64, n)
	mask := make([]int64, n)
	for i, id := range ids {
		idData[i], posData[i], mask[i] = int64(id), int64(i), 1
	}
	var vs values
	defer vs.destroy()
	inputs := make([]onnxrt.Value, 0, m.inputLen)
	step := onnxrt.NewShape(1, n)
	if err := vs.add(&inputs, step, idData); err != nil {
		return nil, nil, fmt.Errorf("model %s: prefill: input_ids: %w", m.name, err)
	}
	if err := vs.add(&inputs, step, mask); err != nil {
		return nil, nil, fmt.Errorf("model %s: prefill: attention_mask: %w", m.name, err)
	}
	if m.hasPositions {
		if err := vs.add(&inputs, step, posData); err != nil {
			return nil, nil, fmt.Errorf("model %s: prefill: position_ids: %w", m.name, err)
		}
	}
	empty := onnxrt.NewShape(1, m.heads, 0, m.headDim)
	for range 2 * m.layers {
		if err := vs.addRaw(&inputs, empty, nil, m.kvType); err != nil {
			return nil, nil, fmt.Errorf("model %s: prefill: empty cache: %w", m.name, err)
		}
	}

	outputs := make([]onnxrt.Value, 0, m.outputLen)
	var all []float32
	var raw []byte // half-precision logits
	if m.vocab > 0 {
		var err error
		if m.logitsType == onnxrt.TensorElementDataTypeFloat {
			all = make([]float32, n*m.vocab)
			err = vs.add(&outputs, onnxrt.NewShape(1, n, m.vocab), all)
		} else {
			raw = make([]byte, n*m.vocab*2)
			err = vs.addRaw(&outputs, onnxrt.NewShape(1, n, m.vocab), raw, m.logitsType)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("model %s: prefill: logits: %w", m.name, err)
		}
	} else {
		outputs = append(outputs, nil) // width unknown until the run
	}
	kv = make([][]byte, 2*m.layers)
	present := onnxrt.NewShape(1, m.heads, n, m.headDim)
	for i := range kv {
		kv[i] = make([]byte, present.FlattenedSize()*m.kvSize)
		if err := vs.addRaw(&outputs, present, kv[i], m.kvType); err != nil {
			return nil, nil, fmt.Errorf("model %s: prefill: present %d: %w", m.name, i, err)
		}
	}
	if err := m.session.Run(inputs, outputs); err != nil {
		if outputs[0] != nil && m.vocab == 0 {
			outputs[0].Destroy()
		}
		return nil, nil, fmt.Errorf("model %s: prefill %d tokens: %w", m.name, n, err)
	}
	if m.vocab == 0 {
		vs.owned = append(vs.owned, outputs[0])
		t, ok := outputs[0].(*onnxrt.Tensor[float32])
		shape := outputs[0].GetShape()
		if !ok || len(shape) != 3 || shape[0] != 1 || shape[1] != n || shape[2] <= 0 {
			return nil, nil, fmt.Errorf("model %s: logits: want float32 [1, %d, vocab], got %T %v", m.name, n, outputs[0], shape)
		}
		all = t.GetData()
	}
	if raw != nil {
		logits = make([]float32, m.vocab)
		widen(logits, raw[(n-1)*m.vocab*2:], m.logitsType == onnxrt.TensorElementDataTypeBFloat16)
		return logits, kv, nil
	}
	vocab := len(all) / int(n)
	logits = make([]float32, vocab)
	copy(logits, all[(n-1)*int64(vocab):])
	return logits, kv, nil
}

// values owns the ONNX Runtime values of one run. The Go slices they view
// stay with the caller; destroy releases only the runtime's handles.
type values struct{ owned []onnxrt.Value }

// add makes a tensor viewing data with shape and appends it to list.
func add[T onnxrt.TensorData](vs *values, list *[]onnxrt.Value, shape onnxrt.Shape, data []T) error {
	t, err := onnxrt.NewTensor(shape, data)
	if err != nil {
		return err
	}
	vs.owned = append(vs.owned, t)
	*list = append(*list, t)
	return nil
}

func (vs *values) add(list *[]onnxrt.Value, shape onnxrt.Shape, data any) error {
	switch d := data.(type) {
	case []int64:
		return add(vs, list, shape, d)
	case []float32:
		return add(vs, list, shape, d)
	}
	return fmt.Errorf("tensor of %T is not supported", data)
}

// addRaw makes a tensor of element type typ viewing data, the tensor's
// bytes, and appends it to list. It is how caches and half-precision
// values reach the runtime.
func (vs *values) addRaw(list *[]onnxrt.Value, shape onnxrt.Shape, data []byte, typ onnxrt.TensorElementDataType) error {
	if len(data) == 0 {
		// onnxruntime_go refuses an empty byte slice even for a shape with
		// no elements (an empty cache); the runtime reads none of it.
		data = make([]byte, 8)
	}
	t, err := onnxrt.NewCustomDataTensor(shape, data, typ)
	if err != nil {
		return err
	}
	vs.owned = append(vs.owned, t)
	*list = append(*list, t)
	return nil
}

func (vs *values) destroy() {
	for _, v := range vs.owned {
		v.Destroy()
	}
	vs.owned = nil
}
