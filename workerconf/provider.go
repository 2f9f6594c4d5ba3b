package workerconf

import "fmt"

// Provider is the ONNX Runtime execution provider a model runs on.
type Provider string

// Providers. The zero value is ProviderCPU.
const (
	ProviderCPU Provider = "cpu"
	// ProviderCUDA runs on an NVIDIA GPU and fails to load when the
	// provider or the CUDA libraries it needs are missing.
	ProviderCUDA Provider = "cuda"
	// ProviderTensorRT runs through TensorRT, with CUDA for what TensorRT
	// does not take; it needs the CUDA provider's libraries too.
	ProviderTensorRT Provider = "tensorrt"
	// ProviderAuto uses CUDA when it loads and otherwise the CPU, with a
	// warning saying which library was missing.
	ProviderAuto Provider = "auto"
)

// ParseProvider reads a provider name; "" is cpu.
func ParseProvider(s string) (Provider, error) {
	switch p := Provider(s); p {
	case "":
		return ProviderCPU, nil
	case ProviderCPU, ProviderCUDA, ProviderTensorRT, ProviderAuto:
		return p, nil
	}
	return "", fmt.Errorf("want cpu, cuda, tensorrt or auto, got %q", s)
}

// OnGPU reports whether p places a session on a GPU when it loads; auto
// may end up on the CPU.
func (p Provider) OnGPU() bool { return p == ProviderCUDA || p == ProviderTensorRT }
