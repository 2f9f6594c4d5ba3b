package main

import (
	"reflect"
	"testing"
	"time"

	"h3infer/backend"
)

// The pool writes the worker's command line with WorkerConfig.Args and this
// package reads it back; a field added to one side only shows up here.
func TestWorkerArgsRoundTrip(t *testing.T) {
	on, off := true, false
	for name, cfg := range map[string]backend.WorkerConfig{
		"full": {
			RingFD: 3,
			Models: []backend.ModelSpec{{Name: "demo", Dir: "/m/demo/1"}, {Name: "b", Dir: "/m/b=2"},
				{Name: "g", Dir: "/m/g", Provider: backend.ProviderCUDA, DeviceID: 1, DeviceKV: &off},
				{Name: "t", Dir: "/m/t", Provider: backend.ProviderTensorRT}, {Name: "a", Dir: "/m/a", Provider: backend.ProviderAuto, DeviceKV: &on}},
			GPUMemoryBytes: 20 << 30,
			ORTLib:         "/opt/ort/libonnxruntime.so.1",
			Slots:          7,
			KVCacheBytes:   3 << 30,
			IntraOpThreads: 2,
			StatsInterval:  250 * time.Millisecond,
			Nice:           7,
		},
		"defaults": {RingFD: 3, Models: []backend.ModelSpec{{Name: "demo", Dir: "/d"}}, ORTLib: "/l.so"},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := parseWorkerFlags(cfg.Args())
			if err != nil {
				t.Fatalf("parseWorkerFlags(%q): %v", cfg.Args(), err)
			}
			if !reflect.DeepEqual(got, cfg) {
				t.Errorf("round trip through %q:\n got %+v\nwant %+v", cfg.Args(), got, cfg)
			}
		})
	}
}

func TestWorkerFlagsRejectBadInput(t *testing.T) {
	for _, args := range [][]string{
		{"--model", "nodir"},
		{"--model", "demo=/d", "--slots", "-1", "--onnxruntime-lib", "/l.so"},
		{"--model", "demo=/d", "--onnxruntime-lib", "/l.so", "extra"},
		{"--model", "demo=/d", "--kv-cache-bytes", "-5", "--onnxruntime-lib", "/l.so"},
		{"--model", "demo=/d", "--provider", "demo=rocm", "--onnxruntime-lib", "/l.so"},
		{"--model", "demo=/d", "--provider", "demo=cuda:-1", "--onnxruntime-lib", "/l.so"},
		{"--provider", "demo=cuda", "--model", "demo=/d", "--onnxruntime-lib", "/l.so"},
		{"--model", "demo=/d", "--device-kv", "demo=maybe", "--onnxruntime-lib", "/l.so"},
		{"--model", "demo=/d", "--gpu-memory-bytes", "-1", "--onnxruntime-lib", "/l.so"},
		{"--model", "demo=/d", "--nice", "20", "--onnxruntime-lib", "/l.so"},
	} {
		if _, err := parseWorkerFlags(args); err == nil {
			t.Errorf("parseWorkerFlags(%q) accepted bad input", args)
		}
	}
}
