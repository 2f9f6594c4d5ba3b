package ort

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"

	onnxrt "github.com/yalue/onnxruntime_go"

	"h3infer/workerconf"
)

// Libraries of the GPU providers. ONNX Runtime looks for its provider
// libraries next to libonnxruntime.so; the CUDA and cuDNN libraries come
// from the host, through the dynamic loader's search path.
const (
	libProvidersShared   = "libonnxruntime_providers_shared.so"
	libProvidersCUDA     = "libonnxruntime_providers_cuda.so"
	libProvidersTensorRT = "libonnxruntime_providers_tensorrt.so"
	// libCUDART is the CUDA runtime the provider set of ORT 1.29 links
	// against (CUDA 13); the worker also uses it to copy a device cache.
	libCUDART = "libcudart.so.13"
	// libCUDNN is loaded by the CUDA provider only when a graph needs it,
	// so the loader does not name it when the provider loads; probing it
	// here turns a failure deep inside the first run into one at start.
	libCUDNN = "libcudnn.so.9"
)

// ortCUDAVersion is the folder under .cache/onnxruntime where make ort-cuda
// puts the ONNX Runtime release that matches the provider set: the core
// library and the providers must come from the same release.
const ortCUDAVersion = "1.29.0-cuda"

// MissingLibraryError says which shared library a provider could not load.
// ONNX Runtime reports this only in its own log, so the worker finds it
// itself by asking the dynamic loader.
type MissingLibraryError struct {
	Provider workerconf.Provider
	Library  string // the library that failed to load
	Reason   string // the loader's message, which names the missing file
}

func (e *MissingLibraryError) Error() string {
	return fmt.Sprintf("provider %s: cannot load %s: %s (docs/GPU.md lists what the host must provide; make ort-cuda fetches the provider set)", e.Provider, e.Library, e.Reason)
}

// ProbeProvider checks that the libraries provider p needs load from the
// folder of the runtime library ortLib and the loader's search path,
// without initializing ONNX Runtime; the gateway calls it before starting
// workers, so that a GPU model that cannot load stops serve at once with
// the missing library's name instead of restarting workers. auto and cpu
// always pass.
func ProbeProvider(p workerconf.Provider, ortLib string) error { return probeProvider(p, ortLib) }

// probeProvider checks, before any session is made, that every library p
// needs loads: the provider libraries next to ortLib (their own NEEDED
// CUDA libraries come with them, so the loader's message names the first
// one missing) and cuDNN.
func probeProvider(p workerconf.Provider, ortLib string) error {
	if !p.OnGPU() {
		return nil
	}
	dir := filepath.Dir(ortLib)
	libs := []string{libProvidersShared, libProvidersCUDA}
	if p == workerconf.ProviderTensorRT {
		libs = append(libs, libProvidersTensorRT)
	}
	for _, lib := range libs {
		path := filepath.Join(dir, lib)
		if _, err := os.Stat(path); err != nil {
			return &MissingLibraryError{Provider: p, Library: lib, Reason: fmt.Sprintf("not found next to %s", filepath.Base(ortLib))}
		}
		if err := dlopenError(path); err != nil {
			return &MissingLibraryError{Provider: p, Library: lib, Reason: err.Error()}
		}
	}
	for _, lib := range []string{libCUDART, libCUDNN} {
		if err := dlopenError(lib); err != nil {
			return &MissingLibraryError{Provider: p, Library: lib, Reason: err.Error()}
		}
	}
	return nil
}

// placement is where LoadModel put a session and how.
type placement struct {
	provider workerconf.Provider // cpu, cuda or tensorrt: what the session runs on
	device   int
}

// cudaEP is the name the CUDA provider's devices carry in ONNX Runtime.
const cudaEP = "CUDAExecutionProvider"

// appendProvider adds p's execution provider to so. The CPU provider
// needs nothing; ONNX Runtime always has it and falls back to it per node.
//
// CUDA goes through the plugin interface of ONNX Runtime 1.23 and later:
// the provider library is registered with the environment and the session
// takes one of the devices it offers. That is the only way the core
// library of the fetched 1.29 set (built without CUDA) runs CUDA; its
// older entry point answers "not enabled in this build". A core library
// built with CUDA whose provider lacks the plugin interface takes the
// older entry point instead.
func appendProvider(so *onnxrt.SessionOptions, p workerconf.Provider, device int, gpuMemLimit int64, ortLib string) error {
	if !p.OnGPU() {
		return nil
	}
	opts := map[string]string{}
	if gpuMemLimit > 0 {
		// The limit bounds the provider's arena, which holds the weights'
		// working set and the device-resident KV cache.
		opts["gpu_mem_limit"] = strconv.FormatInt(gpuMemLimit, 10)
	}
	if p == workerconf.ProviderCUDA {
		pluginErr := appendCUDAPlugin(so, device, opts, ortLib)
		if pluginErr == nil {
			return nil
		}
		if errors.Is(pluginErr, errNoDevice) {
			return pluginErr
		}
		if err := appendLegacy(so, p, device, opts); err != nil {
			return fmt.Errorf("cuda provider: %w; as a plugin: %w", err, pluginErr)
		}
		return nil
	}
	return appendLegacy(so, p, device, opts)
}

// errNoDevice is a CUDA provider that loaded but offers no such device.
var errNoDevice = errors.New("no such CUDA device")

func appendCUDAPlugin(so *onnxrt.SessionOptions, device int, opts map[string]string, ortLib string) error {
	api, err := loadORTAPI(ortLib)
	if err != nil {
		return err
	}
	n, err := api.epDevices(cudaEP)
	if err != nil {
		return fmt.Errorf("list devices: %w", err)
	}
	if n == 0 {
		// Registration is for the whole process; a worker's first CUDA
		// model does it.
		path := filepath.Join(filepath.Dir(ortLib), libProvidersCUDA)
		if err := onnxrt.RegisterExecutionProviderLibrary("CUDA", path); err != nil {
			return fmt.Errorf("register %s: %w", path, err)
		}
	}
	n, err = api.appendEPDevice(so, cudaEP, device, opts)
	if err != nil {
		return fmt.Errorf("append cuda device %d: %w", device, err)
	}
	if device >= n {
		return fmt.Errorf("%w: device_id %d, but the CUDA provider sees %d devices", errNoDevice, device, n)
	}
	return nil
}

// appendLegacy uses the provider entry points of ONNX Runtime builds
// compiled with CUDA or TensorRT.
func appendLegacy(so *onnxrt.SessionOptions, p workerconf.Provider, device int, extra map[string]string) error {
	cuda, err := onnxrt.NewCUDAProviderOptions()
	if err != nil {
		return fmt.Errorf("cuda provider options: %w", err)
	}
	defer cuda.Destroy()
	opts := map[string]string{"device_id": strconv.Itoa(device)}
	for k, v := range extra {
		opts[k] = v
	}
	if err := cuda.Update(opts); err != nil {
		return fmt.Errorf("cuda provider options %v: %w", opts, err)
	}
	if p == workerconf.ProviderTensorRT {
		trt, err := onnxrt.NewTensorRTProviderOptions()
		if err != nil {
			return fmt.Errorf("tensorrt provider options: %w", err)
		}
		defer trt.Destroy()
		if err := trt.Update(map[string]string{"device_id": strconv.Itoa(device)}); err != nil {
			return fmt.Errorf("tensorrt provider options: %w", err)
		}
		if err := so.AppendExecutionProviderTensorRT(trt); err != nil {
			return fmt.Errorf("append tensorrt provider: %w", err)
		}
	}
	if err := so.AppendExecutionProviderCUDA(cuda); err != nil {
		return fmt.Errorf("append cuda provider: %w", err)
	}
	return nil
}

// choosePlacement resolves opts.Provider for a session: it probes the
// libraries of a GPU provider and, for auto, falls back to the CPU with a
// warning when they do not load. A GPU provider named outright fails.
func choosePlacement(opts Options, log *slog.Logger) (placement, error) {
	p := opts.Provider
	if p == "" {
		p = workerconf.ProviderCPU
	}
	want := p
	if p == workerconf.ProviderAuto {
		want = workerconf.ProviderCUDA
	}
	if err := probeProvider(want, opts.ORTLib); err != nil {
		if p != workerconf.ProviderAuto {
			return placement{}, err
		}
		if log != nil {
			log.Warn("cuda unavailable, model runs on the cpu", "model", opts.Name, "err", err)
		}
		return placement{provider: workerconf.ProviderCPU}, nil
	}
	return placement{provider: want, device: opts.DeviceID}, nil
}

// errNoLibrary is returned when a GPU provider is asked for without the
// path of the runtime library, next to which its providers must sit.
var errNoLibrary = errors.New("a GPU provider needs Options.ORTLib, the library its providers sit next to")
