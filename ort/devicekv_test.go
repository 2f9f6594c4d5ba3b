package ort

import (
	"fmt"
	"strings"
	"testing"

	"h3infer/internal/onnxgen"
)

// A device-resident cache goes back to the host while the batch changes
// shape, and nothing of it stays on the device once the last row leaves.
func TestDeviceKVIdleBatchHoldsNothing(t *testing.T) {
	needModel(t)
	on := true
	m, err := LoadModel(demo.ModelDir(), Options{Name: "demo", ORTLib: demo.Lib(), DeviceKV: &on})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if !m.DeviceKV() {
		t.Fatal("model does not keep its cache on the device")
	}
	var next []int
	for _, prompt := range []string{"The ", "A worker ", "In"} {
		ids := m.Encode(prompt)
		_, kv, err := m.Prefill(ids)
		if err != nil {
			t.Fatal(err)
		}
		m.Join(kv, len(ids))
		next = append(next, 'e')
		for range 3 {
			if _, err := m.Step(next); err != nil {
				t.Fatal(err)
			}
		}
		if len(m.run.onDevice) == 0 {
			t.Fatal("after a step the cache is not on the device")
		}
	}
	for r := len(next) - 1; r >= 0; r-- {
		m.Leave(r)
	}
	if n := len(m.run.onDevice); n != 0 || len(m.run.n) != 0 {
		t.Errorf("idle batch still holds %d device values and %d rows", n, len(m.run.n))
	}
}

// BenchmarkDecodeStepKV compares one decode step of a hidden-1024 model
// (4 layers, 16 heads) with the cache in Go memory (kv=host: past inputs
// and present outputs are tensors over Go slices, swapped each step)
// against the IO-binding path (kv=device: present outputs allocated by the
// runtime and fed back as past inputs). On the CPU provider both are host
// memory, so this measures the binding path's own overhead; under CUDA
// the same benchmark would show what keeping the cache on the device saves.
// x_host is ns/token against kv=host at the same rows, in the same run.
//
//	go test -run '^$' -bench DecodeStepKV ./ort/
func BenchmarkDecodeStepKV(b *testing.B) {
	needModel(b)
	dir := randomModelDir(b, onnxgen.Options{Layers: 4, Heads: 16, Hidden: 1024, Seed: 1})
	on, off := true, false
	models := map[string]*Model{}
	for name, kv := range map[string]*bool{"host": &off, "device": &on} {
		m, err := LoadModel(dir, Options{ORTLib: demo.Lib(), DeviceKV: kv})
		if err != nil {
			b.Fatal(err)
		}
		defer m.Close()
		models[name] = m
	}
	const past = 100
	for _, rows := range []int{1, 32} {
		var host float64
		for _, kv := range []string{"host", "device"} {
			b.Run(fmt.Sprintf("rows=%d/kv=%s", rows, kv), func(b *testing.B) {
				m := models[kv]
				prompt := m.Encode(strings.Repeat("The gateway ", past/12+1))[:past]
				_, cache, err := m.Prefill(prompt)
				if err != nil {
					b.Fatal(err)
				}
				perToken := stepLoop(b, m, rows, past, cache)
				b.ReportMetric(perToken, "ns/token")
				if kv == "host" {
					host = perToken
				} else if host > 0 {
					b.ReportMetric(perToken/host, "x_host")
				}
			})
		}
	}
}

// An append-layout model cannot keep its cache on the device (the bound
// path feeds each present back as the next past), so asking for it is
// refused at load rather than served wrong.
func TestDeviceKVRefusesAppendLayout(t *testing.T) {
	needModel(t)
	dir := t.TempDir()
	if err := onnxgen.Write(dir, onnxgen.Options{KVCache: onnxgen.KVCacheAppend}); err != nil {
		t.Fatal(err)
	}
	on := true
	if m, err := LoadModel(dir, Options{ORTLib: demo.Lib(), DeviceKV: &on}); err == nil {
		m.Close()
		t.Fatal("device-resident cache of an append-layout model loaded")
	} else if !strings.Contains(err.Error(), `kv_cache "append"`) {
		t.Errorf("error %q does not name kv_cache", err)
	}
	m, err := LoadModel(dir, Options{ORTLib: demo.Lib()})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.DeviceKV() {
		t.Error("append-layout model keeps its cache on the device by default")
	}
}
