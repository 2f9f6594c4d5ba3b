package workerconf

import "testing"

func TestParseProvider(t *testing.T) {
	good := map[string]Provider{"cpu": ProviderCPU, "": ProviderCPU, "cuda": ProviderCUDA, "tensorrt": ProviderTensorRT, "auto": ProviderAuto}
	for in, want := range good {
		if p, err := ParseProvider(in); err != nil || p != want {
			t.Errorf("ParseProvider(%q) = %s, %v; want %s", in, p, err, want)
		}
	}
	for _, in := range []string{"rocm", "cuda:1", "CUDA"} {
		if _, err := ParseProvider(in); err == nil {
			t.Errorf("ParseProvider(%q) accepted", in)
		}
	}
}
