package workerconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

// RingFD is the descriptor the worker's shared-memory ring has in the
// worker process: the pool passes it as the first of exec.Cmd.ExtraFiles.
const RingFD = 3

// Settings are what one worker process runs with. Each field is the
// config key its comment names, with that key's default: the zero value
// of a field means the documented default, and Validate names the key of
// a value out of range.
type Settings struct {
	// Models are the models to serve (models). A worker needs at least
	// one; the pool and the worker check that, not Validate, so that a
	// config file that lists none (the demo model then) validates.
	Models []Model `json:"models"`
	// ORTLib is the path of the ONNX Runtime shared library
	// (onnxruntime_lib); needed unless every model is synthetic.
	ORTLib string `json:"onnxruntime_lib,omitempty"`
	// Slots is how many sequences the worker generates at once, the
	// largest batch a decode step runs (workers.slots); 0 means AutoSlots
	// of the models the worker starts with, which only the worker can
	// work out. The scheduler sends a worker no more requests than its
	// Ready frame says.
	Slots int `json:"slots,omitempty"`
	// KVCacheBytes bounds the memory of the KV caches of the running
	// sequences (workers.kv_cache_bytes); 0 means 1 GiB. Requests that do
	// not fit wait, most urgent first.
	KVCacheBytes int64 `json:"kv_cache_bytes,omitempty"`
	// IntraOpThreads is ONNX Runtime's intra-op thread count per model
	// (workers.intra_op_threads); 0 means 1.
	IntraOpThreads int `json:"intra_op_threads,omitempty"`
	// GPUMemoryBytes bounds the device memory of the worker's GPU models,
	// split evenly among the models on each device
	// (workers.gpu_memory_bytes); 0 means no bound of ours.
	GPUMemoryBytes int64 `json:"gpu_memory_bytes,omitempty"`
	// Nice is the Linux nice value, 0..MaxNice, of the thread that runs
	// the worker's bulk work (workers.nice); nil means DefaultNice, and 0
	// runs everything at the process's priority.
	Nice *int `json:"nice,omitempty"`
	// StatsInterval is how often the worker reports its counters; 0
	// means 100ms. No config key sets it; tests shorten it.
	StatsInterval time.Duration `json:"stats_interval,omitempty"`
	// CopyWeights has ONNX Runtime copy a CPU model's weights into each
	// worker instead of reading them where they are mapped (ort.Options).
	// No config key sets it; `h3infer worker` sets it from
	// H3INFER_ORT_COPY_WEIGHTS=1, the memory benchmark's baseline.
	CopyWeights bool `json:"copy_weights,omitempty"`
	// WeightsCacheDir is the directory of the prepacked weights cache
	// (workers.weights_cache_dir), where a CPU model with external data
	// gets its weights prepacked and still shared between the workers
	// (ort.Options.WeightsCache). The gateway fills in its default,
	// <state_dir>/cache/weights, and leaves it empty when
	// workers.weights_cache_disabled is set; empty means no cache.
	WeightsCacheDir string `json:"weights_cache_dir,omitempty"`
}

// Defaults and bounds of Settings, as docs/CONFIG.md gives them for the
// workers keys.
const (
	MaxSlots = 1024
	// MinAutoSlots and MaxAutoSlots bound AutoSlots. The floor is the
	// fixed default slots had before they were derived, so no worker gets
	// fewer than it used to, and it leaves three for everyone beside the
	// urgent reserve; where fewer full-context sequences fit, admission
	// by the KV budget holds the others in the worker. The ceiling is
	// from docs/BENCHMARKS.md ("Slots from the KV budget"): on the 2-CPU
	// machine, through the gateway, 64 slots gave the demo model no more
	// tokens/s than 32, while urgent requests beside a bulk backlog had a
	// worse time-to-first-token tail (a batch of 64 steps for 20 ms at
	// 512 cached tokens, which an urgent row in it waits for too).
	MinAutoSlots          = 4
	MaxAutoSlots          = 32
	DefaultKVCacheBytes   = 1 << 30
	MinKVCacheBytes       = 1 << 20
	DefaultIntraOpThreads = 1
	MaxIntraOpThreads     = 256
	// DefaultNice: on the 2-CPU machine of docs/BENCHMARKS.md ("Urgency")
	// it kept the gateway's path for urgent requests from queueing behind
	// model compute.
	DefaultNice = 10
	// MaxNice is Linux's lowest scheduling priority.
	MaxNice              = 19
	DefaultStatsInterval = 100 * time.Millisecond
)

// WithDefaults returns s with every zero value replaced by its default.
func (s Settings) WithDefaults() Settings {
	if s.KVCacheBytes == 0 {
		s.KVCacheBytes = DefaultKVCacheBytes
	}
	if s.IntraOpThreads == 0 {
		s.IntraOpThreads = DefaultIntraOpThreads
	}
	if s.Nice == nil {
		s.Nice = new(DefaultNice)
	}
	if s.StatsInterval == 0 {
		s.StatsInterval = DefaultStatsInterval
	}
	return s
}

// AutoSlots is how many sequences a worker runs at once when
// workers.slots is 0: as many as the KV budget holds at the full context
// of the model that needs the most cache for one, perSeq bytes (vLLM
// bounds its max_num_seqs by its cache the same way), within
// MinAutoSlots..MaxAutoSlots. fit is that count before the bounds; a model
// that keeps no cache (perSeq 0) fits without bound, reported as
// MaxSlots. So every sequence the scheduler sends can run at once, however
// long each grows, and shorter ones leave the budget room to spare.
func AutoSlots(kvBudget, perSeq int64) (slots, fit int) {
	fit = MaxSlots
	if perSeq > 0 {
		fit = int(min(kvBudget/perSeq, MaxSlots))
	}
	return min(max(fit, MinAutoSlots), MaxAutoSlots), fit
}

// Validate reports every value out of range at once, each naming its
// config key; zero values stand for their defaults and pass.
func (s Settings) Validate() error {
	d := s.WithDefaults()
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, a...)))
	}
	if d.Slots < 0 || d.Slots > MaxSlots {
		bad("workers.slots", "must be 1..%d, or 0 to derive them from the KV budget, got %d", MaxSlots, d.Slots)
	}
	if d.KVCacheBytes < MinKVCacheBytes {
		bad("workers.kv_cache_bytes", "must be at least %d, got %d", MinKVCacheBytes, d.KVCacheBytes)
	}
	if d.IntraOpThreads < 1 || d.IntraOpThreads > MaxIntraOpThreads {
		bad("workers.intra_op_threads", "must be 1..%d, got %d", MaxIntraOpThreads, d.IntraOpThreads)
	}
	if d.GPUMemoryBytes < 0 {
		bad("workers.gpu_memory_bytes", "must be >= 0, got %d", d.GPUMemoryBytes)
	}
	if n := *d.Nice; n < 0 || n > MaxNice {
		bad("workers.nice", "must be 0..%d, got %d", MaxNice, n)
	}
	if d.StatsInterval < 0 {
		bad("stats_interval", "must be >= 0, got %s", d.StatsInterval)
	}
	errs = append(errs, validateModels(s.Models)...)
	return errors.Join(errs...)
}

// GPUShare is the device memory bound of one model: GPUMemoryBytes split
// evenly among the models that may run on m's device; 0 when there is no
// bound or m asks for no GPU.
func (s Settings) GPUShare(m Model) int64 {
	if s.GPUMemoryBytes <= 0 || !m.WantsGPU() {
		return 0
	}
	share := 0
	for _, o := range s.Models {
		if o.WantsGPU() && o.DeviceID == m.DeviceID {
			share++
		}
	}
	return s.GPUMemoryBytes / int64(max(share, 1))
}

// The settings travel to the worker process as one command-line argument,
// --settings=JSON, after the `worker` subcommand, rather than in the
// environment or through an inherited descriptor. An argument is fixed at
// exec with the process itself: there is no pipe to write and keep open
// across the fork, and no read in the worker that could block or come up
// short. It is the child's alone, where a variable would pass on to
// anything the worker starts and share the environment with the OTEL_*
// settings the pool hands down there. And `ps` shows an operator exactly
// what a worker runs; nothing in it is secret (paths and sizes). Linux
// bounds one argument at 128 KiB (MAX_ARG_STRLEN), far more than a worker's
// models take; Args refuses more rather than letting exec fail.
const (
	settingsFlag = "--settings="
	maxArgBytes  = 128 << 10
)

// Args is the command line after the `worker` subcommand that hands a
// worker process s. ParseArgs reads it back.
func (s Settings) Args() ([]string, error) {
	b, err := json.Marshal(s)
	if err != nil {
		return nil, fmt.Errorf("worker settings: %w", err)
	}
	arg := settingsFlag + string(b)
	if len(arg) >= maxArgBytes {
		return nil, fmt.Errorf("worker settings: %d bytes encoded, over the %d a command-line argument may hold", len(arg), maxArgBytes)
	}
	return []string{arg}, nil
}

// ParseArgs reads the settings Args wrote, strictly: exactly one
// --settings argument holding one JSON object, no unknown field and
// nothing after it, and settings that Validate accepts.
func ParseArgs(args []string) (Settings, error) {
	if len(args) != 1 || !strings.HasPrefix(args[0], settingsFlag) {
		return Settings{}, fmt.Errorf("worker: want one argument %sJSON, which the gateway's pool writes; got %d arguments", settingsFlag, len(args))
	}
	s, err := decode([]byte(strings.TrimPrefix(args[0], settingsFlag)))
	if err != nil {
		return Settings{}, fmt.Errorf("worker settings: %w", err)
	}
	return s, nil
}

func decode(data []byte) (Settings, error) {
	var s Settings
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return Settings{}, fmt.Errorf("decode: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Settings{}, errors.New("decode: trailing data after the JSON object")
	}
	if err := s.Validate(); err != nil {
		return Settings{}, err
	}
	return s, nil
}
