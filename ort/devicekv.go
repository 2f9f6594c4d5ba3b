package ort

import (
	"fmt"
	"unsafe"

	onnxrt "github.com/yalue/onnxruntime_go"
)

// deviceKV is how a model keeps its batch's KV cache in the execution
// provider's memory (GPU memory under CUDA) between decode steps. Each
// step binds the present outputs to device memory with ONNX Runtime IO
// binding and feeds them back, unchanged, as the next step's past inputs,
// so the cache does not cross to the host per token; only the logits do,
// into page-locked host memory the GPU writes by DMA.
//
// The cache crosses when the batch changes shape: a row joining or
// leaving downloads it into the batch's host buffers, where the layout
// code of the host path rewrites it, and the next step binds those
// buffers as its past inputs, which uploads them once. That is twice per
// request instead of once per token.
//
// Under the CPU provider the same code runs with host memory, which is
// how the tests check it against the host path token for token.
type deviceKV struct {
	api       *ortAPI
	kvMem     memoryInfo   // where present outputs are put
	logitsMem memoryInfo   // where logits are put: pinned host memory under CUDA
	cuda      *cudaRuntime // nil when kvMem is host memory
}

func newDeviceKV(m *Model, ortLib string, place placement) (*deviceKV, error) {
	if ortLib == "" {
		return nil, errNoLibrary
	}
	// Logits are read in place from host memory as float32; a model with
	// half-precision logits keeps its cache in Go memory.
	if m.logitsType != onnxrt.TensorElementDataTypeFloat {
		return nil, fmt.Errorf("logits of element type %d: the device-resident cache needs float32 logits", m.logitsType)
	}
	api, err := loadORTAPI(ortLib)
	if err != nil {
		return nil, err
	}
	d := &deviceKV{api: api}
	kvName, logitsName := "Cpu", "Cpu"
	if place.provider.OnGPU() {
		kvName, logitsName = "Cuda", "CudaPinned"
		if d.cuda, err = loadCUDARuntime(libCUDART); err != nil {
			return nil, &MissingLibraryError{Provider: place.provider, Library: libCUDART, Reason: err.Error()}
		}
	}
	if d.kvMem, err = api.newMemoryInfo(kvName, place.device); err != nil {
		return nil, err
	}
	if d.logitsMem, err = api.newMemoryInfo(logitsName, 0); err != nil {
		d.close()
		return nil, err
	}
	return d, nil
}

func (d *deviceKV) close() {
	if d == nil {
		return
	}
	d.api.releaseMemoryInfo(d.kvMem)
	d.api.releaseMemoryInfo(d.logitsMem)
	d.kvMem, d.logitsMem = memoryInfo{}, memoryInfo{}
}

// download moves a device-resident cache into b.buf[b.cur], so that the
// layout code can rewrite it. A no-op when the host already holds it.
func (b *batch) download() error {
	if len(b.onDevice) == 0 {
		return nil
	}
	d := b.m.dev
	defer b.dropDevice()
	n := len(b.n) * b.rowBytes(b.cols)
	for k, v := range b.onDevice {
		data, shape, err := d.api.tensor(v)
		if err != nil {
			return fmt.Errorf("model %s: read device cache %d: %w", b.m.name, k, err)
		}
		if got := onnxrt.Shape(shape).FlattenedSize() * b.m.kvSize; got != int64(n) {
			return fmt.Errorf("model %s: device cache %d has shape %v, want %d bytes", b.m.name, k, shape, n)
		}
		b.buf[b.cur][k] = grow(b.buf[b.cur][k], n, false)
		if err := toHost(d.cuda, b.buf[b.cur][k], data); err != nil {
			return fmt.Errorf("model %s: download cache %d: %w", b.m.name, k, err)
		}
	}
	return nil
}

// dropDevice releases the device-resident cache.
func (b *batch) dropDevice() {
	if b.m.dev != nil {
		b.m.dev.api.release(b.onDevice...)
	}
	b.onDevice = nil
}

// stepBound is step for a model with a device-resident cache.
func (b *batch) stepBound(next []int) ([]float32, error) {
	m, d := b.m, b.m.dev
	rows := len(b.n)
	cols := b.cols + 1
	if b.binding == nil {
		var err error
		if b.binding, err = m.session.CreateIoBinding(); err != nil {
			return nil, fmt.Errorf("model %s: io binding: %w", m.name, err)
		}
	}
	bind := b.binding
	defer bind.ClearBoundInputs()
	defer bind.ClearBoundOutputs()
	b.stepInputs(cols, next)

	var vs values
	defer vs.destroy()
	var host []onnxrt.Value
	one := onnxrt.NewShape(int64(rows), 1)
	if err := vs.add(&host, one, b.ids); err != nil {
		return nil, fmt.Errorf("model %s: step: input_ids: %w", m.name, err)
	}
	if err := vs.add(&host, onnxrt.NewShape(int64(rows), int64(cols)), b.mask); err != nil {
		return nil, fmt.Errorf("model %s: step: attention_mask: %w", m.name, err)
	}
	if m.hasPositions {
		if err := vs.add(&host, one, b.pos); err != nil {
			return nil, fmt.Errorf("model %s: step: position_ids: %w", m.name, err)
		}
	}
	past := m.inNames[len(host):]
	if len(b.onDevice) == 0 {
		// The host holds the cache (the batch just changed): binding its
		// buffers uploads them once.
		shape := onnxrt.NewShape(int64(rows), m.heads, int64(b.cols), m.headDim)
		for k := range b.buf[b.cur] {
			if err := vs.addRaw(&host, shape, b.buf[b.cur][k][:rows*b.rowBytes(b.cols)], m.kvType); err != nil {
				return nil, fmt.Errorf("model %s: step: past %d: %w", m.name, k, err)
			}
		}
	} else {
		for k, v := range b.onDevice {
			if err := d.api.bindInput(bind, past[k], v); err != nil {
				return nil, fmt.Errorf("model %s: bind %s: %w", m.name, past[k], err)
			}
		}
	}
	for i, v := range host {
		if err := bind.BindInput(m.inNames[i], v); err != nil {
			return nil, fmt.Errorf("model %s: bind %s: %w", m.name, m.inNames[i], err)
		}
	}
	for i, name := range m.outNames {
		mem := d.kvMem
		if i == 0 {
			mem = d.logitsMem
		}
		if err := d.api.bindOutputTo(bind, name, mem); err != nil {
			return nil, fmt.Errorf("model %s: bind %s: %w", m.name, name, err)
		}
	}
	if err := m.session.RunWithBinding(bind); err != nil {
		return nil, fmt.Errorf("model %s: decode step of %d rows over %d columns: %w", m.name, rows, b.cols, err)
	}
	outs, err := d.api.boundOutputs(bind, len(m.outNames))
	if err != nil {
		return nil, fmt.Errorf("model %s: step outputs: %w", m.name, err)
	}
	defer d.api.release(outs[0])
	data, shape, err := d.api.tensor(outs[0])
	if err != nil {
		d.api.release(outs[1:]...)
		return nil, fmt.Errorf("model %s: logits: %w", m.name, err)
	}
	if len(shape) != 3 || shape[0] != int64(rows) || shape[1] != 1 || shape[2] <= 0 {
		d.api.release(outs[1:]...)
		return nil, fmt.Errorf("model %s: logits: want [%d, 1, vocab], got %v", m.name, rows, shape)
	}
	vocab := int(shape[2])
	// The logits are in host memory (pinned under CUDA): read in place.
	b.logits = grow(b.logits, rows*vocab, false)
	copy(b.logits, unsafe.Slice((*float32)(data), rows*vocab))
	b.dropDevice()
	b.onDevice = outs[1:]
	for r := range b.n {
		b.n[r]++
	}
	b.cols = cols
	return b.logits, nil
}
