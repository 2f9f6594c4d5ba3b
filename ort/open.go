package ort

import (
	"fmt"
	"log/slog"

	"h3infer/workerconf"
)

// Open loads the model spec names as a worker with settings s serves it:
// on spec's provider and device, with s's intra-op threads and spec's share
// of s's GPU memory bound. It initializes ONNX Runtime from s.ORTLib first
// if this process has not.
func Open(s workerconf.Settings, spec workerconf.Model, log *slog.Logger) (*Model, error) {
	if err := InitRuntime(s.ORTLib); err != nil {
		return nil, fmt.Errorf("model %s: %w", spec.Name, err)
	}
	m, err := LoadModel(spec.Dir, workerOptions(s, spec, log))
	if err != nil {
		return nil, err
	}
	log.Info("onnx runtime session", "model", m.name, "layers", m.layers, "kv_bytes_per_token", m.kvBytesPerToken(),
		"provider", string(m.Provider()), "device", m.place.device, "device_kv", m.DeviceKV(), "weights", string(m.weights))
	return m, nil
}

// workerOptions are the Options a worker with settings s loads spec with.
func workerOptions(s workerconf.Settings, spec workerconf.Model, log *slog.Logger) Options {
	return Options{
		Name:           spec.Name,
		IntraOpThreads: s.IntraOpThreads,
		Provider:       spec.Provider,
		DeviceID:       spec.DeviceID,
		ORTLib:         s.ORTLib,
		GPUMemoryBytes: s.GPUShare(spec),
		DeviceKV:       spec.DeviceKV,
		CopyWeights:    s.CopyWeights,
		WeightsCache:   s.WeightsCacheDir,
		Log:            log,
	}
}
