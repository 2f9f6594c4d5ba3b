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
// something does. A decode step multiplies a single row by each weight,
// which MLAS does as fast from the file's layout (docs/BENCHMARKS.md,
// "Weights"), so the default leaves the weights where they were mapped.
//
// A model whose weights are inside model.onnx is read whole by ONNX
// Runtime (never by Go) and is a private copy in every worker either way,
// so it keeps prepacking: turning it off would cost decode speed (0.93x,
// docs/BENCHMARKS.md) and share nothing.

// Session config entries (onnxruntime_session_options_config_keys.h).
const (
	configDisablePrepacking = "session.disable_prepacking"
)

// setWeightOptions sets the session options that decide whether the
// weights stay mapped: on the CPU, prepacking off unless copy asks for
// ONNX Runtime's default. A GPU provider copies the weights to the device
// in any case.
func setWeightOptions(so *onnxrt.SessionOptions, place placement, copyWeights bool) error {
	if copyWeights || place.provider.OnGPU() {
		return nil
	}
	return so.AddSessionConfigEntry(configDisablePrepacking, "1")
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
// files beside model.onnx, which ONNX Runtime maps: model.onnx.data as
// torch.onnx and genmodel write it, model.onnx_data as Hugging Face's
// exporter does, or any other *.data file.
func hasExternalData(dir string) bool {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range entries {
		name := e.Name()
		if !e.Type().IsRegular() && e.Type()&os.ModeSymlink == 0 {
			continue
		}
		if name != modelFile && (strings.HasPrefix(name, modelFile) || filepath.Ext(name) == ".data") {
			return true
		}
	}
	return false
}
