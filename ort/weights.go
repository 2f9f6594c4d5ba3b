package ort

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	onnxrt "github.com/yalue/onnxruntime_go"
)

// Where a session's weights live.
//
// ONNX Runtime maps a model's external data (model.onnx.data) into the
// process read-only and, on the CPU, uses the mapped bytes as the
// initializers themselves; what copies them is prepacking: MatMul's CPU
// kernel repacks each constant weight into MLAS's blocked layout in memory
// of the process's own, and frees the mapped original only from its own
// view. The pages of a mapped file are the page cache's, shared by every
// process that maps it, so worker processes of one model hold one copy of
// its weights between them when nothing repacks them, and one each when
// something does.
//
// The packed layout is what makes a multiplication of many rows fast: a
// prefill, or a decode step of a batch of sequences, runs much slower
// from the file's layout (docs/BENCHMARKS.md, "Scenario 3: weights"). So
// a worker with a weights cache (Options.WeightsCache, on by default in
// the gateway) loads such a model from the cache's entry, in which ONNX
// Runtime has saved the packed weights beside the originals
// (weightscache.go): the packed weights are then mapped too, shared like
// the originals. Without a cache, or when the cache cannot serve the
// model, the weights stay where they were mapped, unpacked.
// Options.CopyWeights keeps ONNX Runtime's default, a packed copy in each
// worker, as the benchmark's baseline.
//
// A model whose weights are inside model.onnx is read whole by ONNX
// Runtime (never by Go) and is a private copy in every worker either way,
// so it keeps prepacking: turning it off would cost speed and share
// nothing.

// Session config entries (onnxruntime_session_options_config_keys.h).
const (
	configDisablePrepacking = "session.disable_prepacking"
)

// weightMode is where a session's weights live.
type weightMode string

const (
	// weightsCopied: prepacked by ONNX Runtime into the process's own
	// memory, its default; every model without external data, and
	// Options.CopyWeights.
	weightsCopied weightMode = "copied"
	// weightsMapped: mapped from the model's data files, not prepacked.
	weightsMapped weightMode = "mapped"
	// weightsPrepacked: mapped, prepacked, from an entry of the
	// prepacked weights cache (weightscache.go).
	weightsPrepacked weightMode = "prepacked"
	// weightsDevice: copied to the GPU by its provider.
	weightsDevice weightMode = "device"
)

// weightModeFor is where a session of the model in dir keeps its weights
// on place when nothing fails.
func weightModeFor(dir string, place placement, opts Options) weightMode {
	switch {
	case place.provider.OnGPU():
		return weightsDevice
	case opts.CopyWeights || !hasExternalData(dir):
		return weightsCopied
	case opts.WeightsCache != "":
		return weightsPrepacked
	}
	return weightsMapped
}

// newSession makes the session of the graph in dir on place, with its
// weights where weightModeFor says, and reports where they went: a
// prepacked cache that cannot serve the model is logged and the model
// is loaded mapped instead.
func newSession(dir string, opts Options, place placement, inNames, outNames []string) (*onnxrt.DynamicAdvancedSession, weightMode, error) {
	newOptions := func() (*onnxrt.SessionOptions, error) { return newSessionOptions(opts, place) }
	mode := weightModeFor(dir, place, opts)
	if mode == weightsPrepacked {
		cache := weightsCache{dir: opts.WeightsCache, log: opts.logger()}
		s, _, err := cache.session(dir, newOptions, inNames, outNames)
		if err == nil {
			return s, mode, nil
		}
		cache.log.Warn("prepacked weights cache not used; weights mapped without prepacking", "model_dir", dir, "err", err)
		mode = weightsMapped
	}
	so, err := newOptions()
	if err != nil {
		return nil, mode, err
	}
	defer so.Destroy()
	if mode == weightsMapped {
		if err := so.AddSessionConfigEntry(configDisablePrepacking, "1"); err != nil {
			return nil, mode, fmt.Errorf("weight options: %w", err)
		}
	}
	s, err := onnxrt.NewDynamicAdvancedSession(filepath.Join(dir, modelFile), inNames, outNames, so)
	if err != nil {
		return nil, mode, fmt.Errorf("create session on %s: %w", place.provider, err)
	}
	return s, mode, nil
}

// newSessionOptions are the options every session of a model runs with:
// its provider and thread counts.
func newSessionOptions(opts Options, place placement) (*onnxrt.SessionOptions, error) {
	so, err := onnxrt.NewSessionOptions()
	if err != nil {
		return nil, fmt.Errorf("session options: %w", err)
	}
	if err := appendProvider(so, place.provider, place.device, opts.GPUMemoryBytes, opts.ORTLib); err != nil {
		so.Destroy()
		return nil, err
	}
	if err := so.SetIntraOpNumThreads(max(opts.IntraOpThreads, 1)); err != nil {
		so.Destroy()
		return nil, fmt.Errorf("set intra-op threads: %w", err)
	}
	if err := so.SetInterOpNumThreads(1); err != nil {
		so.Destroy()
		return nil, fmt.Errorf("set inter-op threads: %w", err)
	}
	return so, nil
}

// inspect reads the inputs and outputs of the graph in path.
func inspect(path string) ([]onnxrt.InputOutputInfo, []onnxrt.InputOutputInfo, error) {
	so, err := newInspectOptions()
	if err != nil {
		return nil, nil, fmt.Errorf("session options: %w", err)
	}
	defer so.Destroy()
	return onnxrt.GetInputOutputInfoWithOptions(path, so)
}

// newInspectOptions returns the options of the throwaway session that
// reads the graph's signature: no graph optimization and no prepacking, so
// that reading names and shapes neither rewrites nor repacks weights that
// the real session will load again.
func newInspectOptions() (*onnxrt.SessionOptions, error) {
	so, err := onnxrt.NewSessionOptions()
	if err != nil {
		return nil, err
	}
	if err := so.SetGraphOptimizationLevel(onnxrt.GraphOptimizationLevelDisableAll); err != nil {
		so.Destroy()
		return nil, err
	}
	if err := so.AddSessionConfigEntry(configDisablePrepacking, "1"); err != nil {
		so.Destroy()
		return nil, err
	}
	return so, nil
}

// hasExternalData reports whether the model in dir keeps its weights in
// files beside model.onnx, which ONNX Runtime maps.
func hasExternalData(dir string) bool { return len(externalDataFiles(dir)) > 0 }

// externalDataFiles are the files beside model.onnx in dir that hold its
// weights: model.onnx.data as torch.onnx and genmodel write it,
// model.onnx_data as Hugging Face's exporter does, or any other *.data
// file.
func externalDataFiles(dir string) []string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var files []string
	for _, e := range entries {
		name := e.Name()
		if !e.Type().IsRegular() && e.Type()&os.ModeSymlink == 0 {
			continue
		}
		if name != modelFile && (strings.HasPrefix(name, modelFile) || filepath.Ext(name) == ".data") {
			files = append(files, name)
		}
	}
	return files
}
