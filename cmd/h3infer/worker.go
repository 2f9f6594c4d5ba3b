package main

import (
	"context"
	"log/slog"
	"os"

	"h3infer/engine"
	"h3infer/ort"
	"h3infer/workerconf"
)

// A model of ONNX Runtime is what the generation loop drives, and an
// encoder of ONNX Runtime is what it serves embeddings with.
var (
	_ engine.Model    = (*ort.Model)(nil)
	_ engine.Embedder = (*ort.Encoder)(nil)
)

// runWorker is `h3infer worker`, the worker process a gateway's pool
// starts: its only argument is the settings the pool encoded
// (workerconf.Settings.Args), and its ring is descriptor
// workerconf.RingFD. ONNXRUNTIME_LIB stands in for a library path the
// settings leave out.
func runWorker(ctx context.Context, args []string, log *slog.Logger) error {
	s, err := workerconf.ParseArgs(args)
	if err != nil {
		return usageError{err}
	}
	if s.ORTLib == "" {
		s.ORTLib = os.Getenv("ONNXRUNTIME_LIB")
	}
	// The baseline of scripts/bench-weights.sh: every worker with its own
	// copy of the weights, as before they were mapped.
	if os.Getenv("H3INFER_ORT_COPY_WEIGHTS") == "1" {
		s.CopyWeights = true
	}
	// The pool passes tracing settings in the environment, so a worker
	// exports its own spans exactly when its gateway does.
	tp, shutdown, err := newTracerProvider(ctx, "h3infer-worker", "")
	if err != nil {
		return err
	}
	// The ring's receive loop, and the bulk lane when there is one
	// (procs.go).
	procs := 1
	if n := s.WithDefaults().Nice; *n > 0 {
		procs++
	}
	addProcs(procs)
	err = engine.Run(ctx, os.NewFile(workerconf.RingFD, "h3infer-ring"), engine.Config{
		Settings:       s,
		Load:           ortLoader(s, log),
		TracerProvider: tp,
	}, log)
	sctx, cancel := context.WithTimeout(context.Background(), tracingFlushTimeout)
	defer cancel()
	if serr := shutdown(sctx); serr != nil {
		log.Warn("tracing: flush on exit", "err", serr)
	}
	return err
}

// ortLoader loads model directories with ONNX Runtime, as a worker with
// settings s serves them: an encoder (model.json task embed) as an
// ort.Encoder, any other model as an ort.Model.
func ortLoader(s workerconf.Settings, log *slog.Logger) func(workerconf.Model) (engine.Model, error) {
	return func(spec workerconf.Model) (engine.Model, error) {
		if cfg, err := workerconf.ReadModelConfig(spec.Dir); err == nil && cfg.IsEncoder() {
			e, err := ort.OpenEncoder(s, spec, log)
			if err != nil {
				return nil, err
			}
			return e, nil
		}
		m, err := ort.Open(s, spec, log)
		if err != nil {
			return nil, err
		}
		return m, nil
	}
}
