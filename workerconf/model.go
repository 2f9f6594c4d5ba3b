package workerconf

import (
	"fmt"
	"strings"
	"time"
)

// Model names a model a worker serves: a model directory and the name
// it is served under, and where it runs. Its JSON keys are those of an
// entry of the config file's models list.
type Model struct {
	Name string `json:"name"`
	// Dir is a model directory (model.json, tokenizer.json, model.onnx),
	// or SyntheticDir.
	Dir string `json:"dir"`
	// Provider is the execution provider; "" is cpu.
	Provider Provider `json:"provider,omitempty"`
	// DeviceID is the GPU of a cuda, tensorrt or auto model.
	DeviceID int `json:"device_id,omitempty"`
	// DeviceKV keeps the KV cache in the provider's memory between steps;
	// nil means on exactly when the model runs on a GPU.
	DeviceKV *bool `json:"device_kv,omitempty"`
}

// WantsGPU reports whether the model asks for a GPU provider, auto
// included.
func (m Model) WantsGPU() bool { return m.Provider != "" && m.Provider != ProviderCPU }

// SyntheticDir is the model "directory" that selects the synthetic model:
// no ONNX Runtime and no model cost, a token as fast as the ring takes it.
// "synthetic:2ms" paces each sequence at one token per 2ms instead. It
// exists to measure the gateway's own overhead (h3infer bench).
const SyntheticDir = "synthetic"

// ParseSynthetic reports whether dir names the synthetic model and, if so,
// its per-token interval (0: unpaced).
func ParseSynthetic(dir string) (interval time.Duration, ok bool, err error) {
	rest, found := strings.CutPrefix(dir, SyntheticDir)
	if !found || (rest != "" && rest[0] != ':') {
		return 0, false, nil
	}
	if rest == "" {
		return 0, true, nil
	}
	interval, err = time.ParseDuration(rest[1:])
	if err != nil || interval < 0 {
		return 0, true, fmt.Errorf("synthetic model %q: want synthetic or synthetic:INTERVAL such as synthetic:2ms", dir)
	}
	return interval, true, nil
}

// validateModels reports every problem of models, each naming its config
// key (models[i].name and so on). That a directory holds a model is
// checked by whoever reads it.
func validateModels(models []Model) []error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, a...)))
	}
	seen := map[string]bool{}
	for i, m := range models {
		key := fmt.Sprintf("models[%d]", i)
		if m.Name == "" {
			bad(key+".name", "must not be empty")
		} else if seen[m.Name] {
			bad(key+".name", "%q is listed twice", m.Name)
		}
		seen[m.Name] = true
		if _, synth, err := ParseSynthetic(m.Dir); synth {
			if err != nil {
				bad(key+".dir", "%v", err)
			}
		} else if m.Dir == "" {
			bad(key+".dir", "must not be empty")
		}
		if _, err := ParseProvider(string(m.Provider)); err != nil {
			bad(key+".provider", "%v", err)
		}
		if m.DeviceID < 0 {
			bad(key+".device_id", "must be >= 0, got %d", m.DeviceID)
		} else if m.DeviceID != 0 && !m.WantsGPU() {
			bad(key+".device_id", "set to %d, but provider %q runs on no GPU", m.DeviceID, m.Provider)
		}
	}
	return errs
}
