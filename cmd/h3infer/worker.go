package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"h3infer/backend"
)

// runWorker is `h3infer worker`, the worker process a gateway's pool
// starts with the flags backend.WorkerConfig.Args writes; keep the two in
// step.
func runWorker(ctx context.Context, args []string, log *slog.Logger) error {
	cfg, err := parseWorkerFlags(args)
	if err != nil {
		return err
	}
	// The pool passes tracing settings in the environment, so a worker
	// exports its own spans exactly when its gateway does.
	tp, shutdown, err := newTracerProvider(ctx, "h3infer-worker", "")
	if err != nil {
		return err
	}
	cfg.TracerProvider = tp
	// The ring's receive loop, and the bulk lane when there is one
	// (procs.go).
	procs := 1
	if cfg.Nice > 0 {
		procs++
	}
	addProcs(procs)
	err = backend.RunWorker(ctx, cfg, log)
	sctx, cancel := context.WithTimeout(context.Background(), tracingFlushTimeout)
	defer cancel()
	if serr := shutdown(sctx); serr != nil {
		log.Warn("tracing: flush on exit", "err", serr)
	}
	return err
}

// parseWorkerFlags reads the worker command line into a
// backend.WorkerConfig. ONNXRUNTIME_LIB stands in for a missing
// --onnxruntime-lib.
func parseWorkerFlags(args []string) (backend.WorkerConfig, error) {
	var cfg backend.WorkerConfig
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.IntVar(&cfg.RingFD, "ring-fd", 3, "file descriptor of the shared-memory ring inherited from the gateway")
	fs.Func("model", "a model to serve, as NAME=DIR (repeatable)", func(v string) error {
		name, dir, ok := strings.Cut(v, "=")
		if !ok || name == "" || dir == "" {
			return fmt.Errorf("want NAME=DIR, got %q", v)
		}
		cfg.Models = append(cfg.Models, backend.ModelSpec{Name: name, Dir: dir})
		return nil
	})
	fs.StringVar(&cfg.ORTLib, "onnxruntime-lib", "", "path of libonnxruntime.so (default $ONNXRUNTIME_LIB)")
	fs.IntVar(&cfg.Slots, "slots", 0, fmt.Sprintf("sequences generated at once, the largest decode batch (0: %d)", backend.DefaultSlots))
	fs.Int64Var(&cfg.KVCacheBytes, "kv-cache-bytes", 0, fmt.Sprintf("KV-cache memory budget of the running sequences (0: %d)", backend.DefaultKVCacheBytes))
	fs.IntVar(&cfg.IntraOpThreads, "intra-op-threads", 0, "ONNX Runtime intra-op threads per model (0: 1)")
	fs.DurationVar(&cfg.StatsInterval, "stats-interval", 0, fmt.Sprintf("how often to report counters (0: %s)", backend.DefaultStatsInterval))
	fs.Int64Var(&cfg.GPUMemoryBytes, "gpu-memory-bytes", 0, "device memory budget of the worker's GPU models (0: none)")
	fs.IntVar(&cfg.Nice, "nice", 0, fmt.Sprintf("nice value of the thread running bulk work, 0..%d (0: everything at the process's priority)", backend.MaxNice))
	// Per-model settings name a model given by an earlier --model.
	spec := func(v string) (*backend.ModelSpec, string, error) {
		name, val, ok := strings.Cut(v, "=")
		if !ok {
			return nil, "", fmt.Errorf("want NAME=VALUE, got %q", v)
		}
		for i := range cfg.Models {
			if cfg.Models[i].Name == name {
				return &cfg.Models[i], val, nil
			}
		}
		return nil, "", fmt.Errorf("no --model named %q before it", name)
	}
	fs.Func("provider", "a model's execution provider, as NAME=cpu|cuda[:DEVICE]|tensorrt[:DEVICE]|auto[:DEVICE]", func(v string) error {
		s, val, err := spec(v)
		if err != nil {
			return err
		}
		s.Provider, s.DeviceID, err = backend.ParsePlacement(val)
		return err
	})
	fs.Func("device-kv", "whether a model keeps its KV cache on the device between steps, as NAME=true|false", func(v string) error {
		s, val, err := spec(v)
		if err != nil {
			return err
		}
		on, err := strconv.ParseBool(val)
		if err != nil {
			return err
		}
		s.DeviceKV = &on
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return backend.WorkerConfig{}, usageError{err}
	}
	if fs.NArg() > 0 {
		return backend.WorkerConfig{}, usageError{fmt.Errorf("unexpected arguments %q", fs.Args())}
	}
	if cfg.ORTLib == "" {
		cfg.ORTLib = os.Getenv("ONNXRUNTIME_LIB")
	}
	if err := cfg.Validate(); err != nil {
		return backend.WorkerConfig{}, usageError{err}
	}
	return cfg, nil
}
