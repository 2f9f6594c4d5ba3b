package backend

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"h3infer/infer"
	"h3infer/priority"
	"h3infer/transport"
)

// Span names of the worker's two phases of a request.
const (
	phasePrefill = "prefill"
	phaseDecode  = "decode"
)

// ModelSpec names a model directory a worker serves and the name it is
// served under.
type ModelSpec struct {
	Name string
	Dir  string
	// Provider is the execution provider; "" is cpu.
	Provider Provider
	// DeviceID is the GPU of a cuda or tensorrt model.
	DeviceID int
	// DeviceKV keeps the KV cache in the provider's memory between steps;
	// nil means on exactly when the model runs on a GPU.
	DeviceKV *bool
}

// WorkerConfig configures one worker process. Zero values mean the
// documented defaults.
//
// The same settings travel as the `h3infer worker` command line, which
// Args writes and cmd/h3infer/worker.go parses; change both together.
type WorkerConfig struct {
	// RingFD is the file descriptor of the shared-memory segment the
	// worker inherits; the Pool passes it as fd 3.
	RingFD int
	// Models are the models to load; at least one.
	Models []ModelSpec
	// ORTLib is the path of the ONNX Runtime shared library.
	ORTLib string
	// Slots is how many sequences the worker generates at once, the
	// largest batch a decode step runs; 0 means 4. The scheduler sends a
	// worker no more requests than this.
	Slots int
	// KVCacheBytes bounds the memory of the KV caches of the running
	// sequences; 0 means 1 GiB. A sequence is counted at its full
	// reservation (prompt plus max_tokens) and a batch at its padded shape
	// in both of its buffers; see workerLoop.fits. Requests that do not fit
	// wait, most urgent first.
	KVCacheBytes int64
	// IntraOpThreads is ONNX Runtime's intra-op thread count per model;
	// 0 means 1.
	IntraOpThreads int
	// StatsInterval is how often the worker reports its counters; 0 means
	// 100ms.
	StatsInterval time.Duration
	// TracerProvider makes the prefill and decode spans, children of the
	// gateway's span named by each Submit's TraceParent. It is not part of
	// the command line: the worker process builds it from the OTEL_*
	// environment it inherits. nil means no tracing.
	TracerProvider trace.TracerProvider
	// GPUMemoryBytes bounds the device memory of the worker's GPU models,
	// split evenly among the models on each device (the CUDA provider's
	// arena limit); 0 means no bound of ours.
	GPUMemoryBytes int64
	// Nice is the Linux nice value, 0..MaxNice, of the thread that runs
	// bulk work (decode steps of batches without an urgent sequence,
	// prefills of requests that are not urgent): it yields contended CPUs
	// to the gateway and to urgent work, which the loop's own thread runs
	// at the process's priority, alongside a bulk step (nice.go). 0 runs
	// everything on the loop's thread, one thing at a time.
	// Which requests are urgent is their class (infer.Request.Class),
	// decided at admission.
	Nice int
}

// Defaults of WorkerConfig.
const (
	DefaultSlots         = 4
	DefaultKVCacheBytes  = 1 << 30
	DefaultStatsInterval = 100 * time.Millisecond
)

// Args is the command line, after the `worker` subcommand, that gives a
// worker process this configuration. cmd/h3infer/worker.go parses it.
func (c WorkerConfig) Args() []string {
	args := []string{"--ring-fd=" + strconv.Itoa(c.RingFD)}
	for _, m := range c.Models {
		args = append(args, "--model="+m.Name+"="+m.Dir)
		if m.Provider != "" || m.DeviceID != 0 {
			args = append(args, "--provider="+m.Name+"="+FormatPlacement(m.Provider, m.DeviceID))
		}
		if m.DeviceKV != nil {
			args = append(args, "--device-kv="+m.Name+"="+strconv.FormatBool(*m.DeviceKV))
		}
	}
	if c.ORTLib != "" {
		args = append(args, "--onnxruntime-lib="+c.ORTLib)
	}
	if c.Slots != 0 {
		args = append(args, "--slots="+strconv.Itoa(c.Slots))
	}
	if c.KVCacheBytes != 0 {
		args = append(args, "--kv-cache-bytes="+strconv.FormatInt(c.KVCacheBytes, 10))
	}
	if c.IntraOpThreads != 0 {
		args = append(args, "--intra-op-threads="+strconv.Itoa(c.IntraOpThreads))
	}
	if c.StatsInterval != 0 {
		args = append(args, "--stats-interval="+c.StatsInterval.String())
	}
	if c.GPUMemoryBytes != 0 {
		args = append(args, "--gpu-memory-bytes="+strconv.FormatInt(c.GPUMemoryBytes, 10))
	}
	if c.Nice != 0 {
		args = append(args, "--nice="+strconv.Itoa(c.Nice))
	}
	return args
}

// Validate reports every invalid field at once, each naming its flag.
func (c WorkerConfig) Validate() error {
	var errs []error
	if c.RingFD < 3 {
		errs = append(errs, fmt.Errorf("ring-fd: must be >= 3 (0-2 are stdio), got %d", c.RingFD))
	}
	if len(c.Models) == 0 {
		errs = append(errs, errors.New("model: at least one is required"))
	}
	seen := map[string]bool{}
	for i, m := range c.Models {
		switch {
		case m.Name == "" || m.Dir == "":
			errs = append(errs, fmt.Errorf("model[%d]: want name=dir, got name %q dir %q", i, m.Name, m.Dir))
		case seen[m.Name]:
			errs = append(errs, fmt.Errorf("model[%d]: name %q used twice", i, m.Name))
		}
		seen[m.Name] = true
		if _, err := ParseProvider(string(m.Provider)); err != nil {
			errs = append(errs, fmt.Errorf("provider of model %q: %w", m.Name, err))
		}
		if m.DeviceID < 0 {
			errs = append(errs, fmt.Errorf("provider of model %q: device id must be >= 0, got %d", m.Name, m.DeviceID))
		}
	}
	if c.GPUMemoryBytes < 0 {
		errs = append(errs, fmt.Errorf("gpu-memory-bytes: must be >= 0, got %d", c.GPUMemoryBytes))
	}
	if c.Slots < 0 {
		errs = append(errs, fmt.Errorf("slots: must be >= 0, got %d", c.Slots))
	}
	if c.KVCacheBytes < 0 {
		errs = append(errs, fmt.Errorf("kv-cache-bytes: must be >= 0, got %d", c.KVCacheBytes))
	}
	if c.IntraOpThreads < 0 {
		errs = append(errs, fmt.Errorf("intra-op-threads: must be >= 0, got %d", c.IntraOpThreads))
	}
	if c.StatsInterval < 0 {
		errs = append(errs, fmt.Errorf("stats-interval: must be >= 0, got %s", c.StatsInterval))
	}
	if c.Nice < 0 || c.Nice > MaxNice {
		errs = append(errs, fmt.Errorf("nice: must be 0..%d, got %d", MaxNice, c.Nice))
	}
	return errors.Join(errs...)
}

func (c WorkerConfig) withDefaults() WorkerConfig {
	if c.Slots == 0 {
		c.Slots = DefaultSlots
	}
	if c.StatsInterval == 0 {
		c.StatsInterval = DefaultStatsInterval
	}
	if c.KVCacheBytes == 0 {
		c.KVCacheBytes = DefaultKVCacheBytes
	}
	return c
}

// modelOptions are the options LoadModel gets for spec: the GPU memory
// budget is split evenly among the models that may run on spec's device.
func (c WorkerConfig) modelOptions(spec ModelSpec, log *slog.Logger) ModelOptions {
	o := ModelOptions{Name: spec.Name, IntraOpThreads: c.IntraOpThreads, Provider: spec.Provider, DeviceID: spec.DeviceID,
		ORTLib: c.ORTLib, DeviceKV: spec.DeviceKV, Log: log}
	if c.GPUMemoryBytes > 0 && spec.Provider != "" && spec.Provider != ProviderCPU {
		share := 0
		for _, m := range c.Models {
			if m.Provider != "" && m.Provider != ProviderCPU && m.DeviceID == spec.DeviceID {
				share++
			}
		}
		o.GPUMemoryBytes = c.GPUMemoryBytes / int64(share)
	}
	return o
}

// FormatPlacement writes a provider and device as the worker's --provider
// flag takes them: "cuda:1", or the provider alone for device 0.
func FormatPlacement(p Provider, device int) string {
	if p == "" {
		p = ProviderCPU
	}
	if device == 0 {
		return string(p)
	}
	return string(p) + ":" + strconv.Itoa(device)
}

// ParsePlacement reads what FormatPlacement writes.
func ParsePlacement(s string) (Provider, int, error) {
	name, dev, hasDev := strings.Cut(s, ":")
	p, err := ParseProvider(name)
	if err != nil {
		return "", 0, err
	}
	if !hasDev {
		return p, 0, nil
	}
	d, err := strconv.Atoi(dev)
	if err != nil || d < 0 {
		return "", 0, fmt.Errorf("device: want a number >= 0, got %q", dev)
	}
	return p, d, nil
}

// RunWorker is the worker process: it maps the ring from cfg.RingFD, loads
// the models, announces itself with Ready and then serves submits until
// the ring closes (a clean exit, nil) or ctx ends. Up to cfg.Slots
// sequences run at once, batched: each decode step advances all of a
// model's running sequences by one token in one ONNX Runtime call.
//
// The worker does not notice by itself that its parent died; the Pool
// starts it with Pdeathsig so the kernel ends it.
func RunWorker(ctx context.Context, cfg WorkerConfig, log *slog.Logger) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("worker config: %w", err)
	}
	cfg = cfg.withDefaults()
	f := os.NewFile(uintptr(cfg.RingFD), "h3infer-ring")
	if f == nil {
		return fmt.Errorf("worker: ring fd %d is not open", cfg.RingFD)
	}
	seg, err := transport.OpenSegment(f)
	if err != nil {
		f.Close()
		return fmt.Errorf("worker: open ring fd %d: %w", cfg.RingFD, err)
	}
	defer seg.Close()
	end := transport.NewWorkerEnd(seg)
	// Closing our end tells the gateway at once, whatever made us stop.
	defer end.Close()

	// Synthetic models (bench tooling) need no ONNX Runtime and have a loop
	// of their own in synthetic.go.
	if synth, err := syntheticOnly(cfg); err != nil {
		return err
	} else if synth {
		return runSynthetic(ctx, cfg, end, log)
	}
	if err := InitRuntime(cfg.ORTLib); err != nil {
		return fmt.Errorf("worker: %w", err)
	}
	models := map[string]*Model{}
	defer func() {
		for name, m := range models {
			if err := m.Close(); err != nil {
				log.Warn("close model", "model", name, "err", err)
			}
		}
	}()
	ready := transport.Ready{PID: uint32(os.Getpid()), Slots: uint32(cfg.Slots)}
	for _, spec := range cfg.Models {
		m, err := LoadModel(spec.Dir, cfg.modelOptions(spec, log))
		if err != nil {
			return fmt.Errorf("worker: %w", err)
		}
		models[spec.Name] = m
		ready.Models = append(ready.Models, m.Info())
		log.Info("model loaded", "model", spec.Name, "dir", spec.Dir, "context_length", m.cfg.ContextLength, "layers", m.layers,
			"kv_bytes_per_token", m.kvBytesPerToken(), "provider", string(m.Provider()), "device", m.place.device, "device_kv", m.DeviceKV())
	}
	w := newWorkerLoop(end, cfg.Slots, cfg.KVCacheBytes, models, log)
	if cfg.TracerProvider != nil {
		w.tracer = cfg.TracerProvider.Tracer(tracerName)
	}
	w.loadOpts = ModelOptions{IntraOpThreads: cfg.IntraOpThreads}
	defer w.closeAll()
	if err := end.SendReady(ready); err != nil {
		return closedOK(fmt.Errorf("worker: send ready: %w", err))
	}
	log.Info("worker ready", "pid", ready.PID, "slots", cfg.Slots)

	inbox := make(chan inbound, 64)
	recvErr := make(chan error, 1)
	stopRecv := make(chan struct{})
	w.inbox, w.stop = inbox, stopRecv
	var wg sync.WaitGroup
	wg.Go(func() { receive(end, inbox, recvErr, stopRecv) })
	defer func() {
		end.Close() // wakes a Recv sleeping on the ring
		close(stopRecv)
		wg.Wait()
		w.loaders.Wait() // a loader that could not hand its model over closed it
	}()
	if cfg.Nice > 0 {
		if w.bulk, err = newLane(cfg.Nice); err != nil {
			return fmt.Errorf("worker: bulk lane: %w", err)
		}
		defer w.bulk.close()
	}
	return closedOK(w.serve(ctx, inbox, recvErr, cfg.StatsInterval))
}

// closedOK turns the ring closing, the normal way for a worker to be told
// to stop, into a clean exit.
func closedOK(err error) error {
	if errors.Is(err, transport.ErrClosed) {
		return nil
	}
	return err
}

// inbound is one frame from the gateway, decoded by the receive goroutine
// because Recv reuses the payload's storage.
type inbound struct {
	typ     transport.FrameType
	id      uint64
	submit  infer.Request
	control transport.Control
	err     error
	// loaded is set, with typ 0, by a loader goroutine handing the loop
	// the outcome of a ControlLoad.
	loaded *loadOutcome
}

// receive runs Recv until the ring closes or stop is closed. It does not
// lock its thread: Recv holds the thread only while it sleeps, and a
// locked receiver handed the loop it had just readied to another thread,
// which the kernel had to wake first (transport's GatewayEnd.Run says more).
func receive(end *transport.WorkerEnd, inbox chan<- inbound, recvErr chan<- error, stop <-chan struct{}) {
	for {
		f, err := end.Recv()
		if err != nil {
			recvErr <- err
			return
		}
		in := inbound{typ: f.Type, id: f.ID}
		switch f.Type {
		case transport.FrameSubmit:
			in.submit, in.err = transport.DecodeSubmit(f.Payload)
		case transport.FrameControl:
			in.control, in.err = transport.DecodeControl(f.Payload)
		}
		select {
		case inbox <- in:
		case <-stop:
			return
		}
	}
}

// sender is what the loop sends on the ring; *transport.WorkerEnd in the
// worker, a recorder in tests that need to see exactly which tokens left.
type sender interface {
	SendTokens(ts []transport.TokenOut) error
	SendDone(id uint64, d infer.Done) error
	SendError(id uint64, e infer.Error) error
	SendStats(s transport.Stats) error
	// Beat counts the heartbeat the pool's hang detection watches.
	Beat()
}

// running is one admitted request: waiting for room in its model's batch
// (pending) or generating in it.
type running struct {
	id      uint64
	urgency priority.Urgency
	class   priority.Class
	arrival uint64 // admission order, breaking ties of urgency
	gen     *generation
	batch   *batch // its model's batch

	ctx   context.Context // carries the gateway's span, when traced
	span  trace.Span      // prefill from admission to the first token, then decode
	phase string
}

// workerLoop is the generation loop's state; only serve's goroutine
// touches it, except the batch or sequence whose bulk work runs on the bulk
// lane meanwhile (aside).
//
// Slots and the KV-cache budget bound the batch. The scheduler sends a
// worker at most Slots requests at once, so admission only ever waits for
// KV memory; waiting requests are taken most urgent first (lowest RFC 9218
// u), then oldest. The head of that order is never overtaken, so a large
// urgent request is not starved by a stream of small, less urgent ones.
// Running sequences are never preempted: a sequence keeps its slot until
// it finishes or is cancelled.
type workerLoop struct {
	// outTokens are the token frames of the current step, sent in one
	// publish (flushTokens) rather than one ring publish per sequence.
	outTokens []transport.TokenOut
	end       sender
	slots     int
	kvBudget  int64
	models    map[string]*Model
	batches   []*batch // one per model, in a fixed order
	pending   []*running
	byID      map[uint64]*running
	byGen     map[*generation]*running
	arrivals  uint64
	stats     transport.Stats
	log       *slog.Logger
	tracer    trace.Tracer

	// Versions come and go while the loop runs (control.go): loaders run
	// beside the loop and hand their model back through inbox; draining
	// models take no new requests and close once their last sequence ends.
	loadOpts ModelOptions
	inbox    chan<- inbound
	stop     <-chan struct{}
	loaders  sync.WaitGroup
	loading  map[string]bool
	draining map[*Model]bool

	// bulk, when set, runs the work of requests that are not urgent at a
	// lower priority than the loop's thread (nice.go); nil runs all of it
	// on the loop's thread.
	bulk *lane
	// While a bulk step runs aside, prefilled holds the urgent requests
	// prefilled meanwhile, to join their batch once the step is done,
	// and held the frames other than submits, to act on then.
	prefilled  []*prefilledRun
	held       []inbound
	prefilling *running // a bulk request whose prefill runs aside
}

// prefilledRun is an urgent request prefilled beside a bulk step, waiting
// to join its batch.
type prefilledRun struct {
	r  *running
	kv [][]byte
}

// tracerName is the instrumentation scope of the worker's spans.
const tracerName = "h3infer/backend"

// maxPrefillTokens bounds the prompt tokens prefilled between two decode
// steps, so that a burst of arrivals delays the running sequences' next
// token by a bounded amount. One prompt is always taken, however long.
const maxPrefillTokens = 1024

func newWorkerLoop(end sender, slots int, kvBudget int64, models map[string]*Model, log *slog.Logger) *workerLoop {
	w := &workerLoop{end: end, slots: slots, kvBudget: kvBudget, models: models, byID: map[uint64]*running{}, byGen: map[*generation]*running{},
		loading: map[string]bool{}, draining: map[*Model]bool{}, log: log, tracer: noop.NewTracerProvider().Tracer(tracerName)}
	names := make([]string, 0, len(models))
	for name := range models {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		w.batches = append(w.batches, models[name].newBatch())
	}
	return w
}

func (w *workerLoop) serve(ctx context.Context, inbox <-chan inbound, recvErr <-chan error, every time.Duration) error {
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	for {
		// The gateway's hang detection watches this. Idle, the loop passes
		// here at least every stats interval (the ticker below); busy, once
		// per decode round.
		w.end.Beat()
		if len(w.byID) == 0 {
			select {
			case in := <-inbox:
				if err := w.handle(in); err != nil {
					return err
				}
			case err := <-recvErr:
				return err
			case <-ticker.C:
				if err := w.sendStats(); err != nil {
					return err
				}
			case <-ctx.Done():
				return nil
			}
			continue
		}
		select {
		case err := <-recvErr:
			return err
		case <-ticker.C:
			if err := w.sendStats(); err != nil {
				return err
			}
		case <-ctx.Done():
			return nil
		default:
		}
		if err := w.round(inbox); err != nil {
			return err
		}
		if len(w.byID) == 0 {
			if err := w.sendStats(); err != nil {
				return err
			}
		}
	}
}

// round is one step boundary: take in frames, start waiting sequences
// that fit, then advance every batch by one token.
func (w *workerLoop) round(inbox <-chan inbound) error {
	// After a failed step, requests prefilled beside it still join.
	w.joinPrefilled()
	if err := w.drain(inbox); err != nil {
		return err
	}
	if err := w.start(inbox); err != nil {
		return err
	}
	// Urgent requests that started beside a bulk prefill join before the
	// step.
	w.joinPrefilled()
	for _, b := range w.batches {
		if len(b.rows) == 0 {
			continue
		}
		var err error
		if w.bulk == nil || w.carriesUrgent(b) {
			err = b.step()
		} else if aerr := w.aside(inbox, func() { err = b.step() }); aerr != nil {
			return aerr
		}
		if err != nil {
			return w.failBatch(b, err)
		}
		// Cancels that arrived during the step drop their rows before the
		// step's tokens go out, so a cancelled sequence sends nothing
		// after the step in flight.
		if err := w.drain(inbox); err != nil {
			return err
		}
		for _, g := range slices.Clone(b.rows) {
			if err := w.emit(w.byRow(g)); err != nil {
				return err
			}
		}
		if err := w.flushTokens(); err != nil {
			return err
		}
		w.joinPrefilled()
	}
	w.reap()
	return nil
}

// byRow finds the request of a batch row.
func (w *workerLoop) byRow(g *generation) *running { return w.byGen[g] }

func (w *workerLoop) drain(inbox <-chan inbound) error {
	if err := w.handleHeld(); err != nil {
		return err
	}
	for {
		select {
		case in := <-inbox:
			if err := w.handle(in); err != nil {
				return err
			}
		default:
			return nil
		}
	}
}

// start moves waiting requests into their batches, most urgent first,
// while the KV budget allows, prefilling each alone and sending its first
// token.
func (w *workerLoop) start(inbox <-chan inbound) error {
	prefilled := 0
	for len(w.pending) > 0 && prefilled < maxPrefillTokens {
		r := w.pending[0]
		if !w.fits(r) {
			return nil
		}
		w.pending = w.pending[1:]
		// The span began at admission; the time before this event is the
		// wait for KV room and for the sequences ahead of it.
		r.span.AddEvent("prefill_started")
		var kv [][]byte
		var err error
		if w.bulk == nil || w.isUrgent(r) {
			kv, err = r.gen.prefill()
		} else {
			// Counted against the KV budget while urgent requests
			// start beside it.
			w.prefilling = r
			aerr := w.aside(inbox, func() { kv, err = r.gen.prefill() })
			w.prefilling = nil
			if aerr != nil {
				return aerr
			}
		}
		if err != nil {
			if err := w.prefillFailed(r, err); err != nil {
				return err
			}
			continue
		}
		prefilled += len(r.gen.prompt)
		r.batch.join(r.gen, kv)
		if err := w.emit(r); err != nil {
			return err
		}
		// The first token goes out now, not after the next prefill.
		if err := w.flushTokens(); err != nil {
			return err
		}
	}
	return nil
}

// prefillFailed answers r with the error of its prefill and drops it.
func (w *workerLoop) prefillFailed(r *running, err error) error {
	w.log.Error("prefill failed", "request_id", r.id, "err", err)
	r.span.RecordError(err)
	r.span.SetStatus(codes.Error, "prefill failed")
	w.forget(r)
	w.stats.SequencesFinished++
	return w.sendError(r.id, infer.Error{Code: infer.CodeInternal, Message: "prefill failed: " + err.Error()})
}

// isUrgent says whether r's work runs on the loop's thread, at the
// process's priority, rather than on the bulk lane.
func (w *workerLoop) isUrgent(r *running) bool {
	return r != nil && r.class == priority.Urgent
}

// carriesUrgent says whether a step of b advances an urgent sequence: the
// step is shared, so the whole batch then runs on the loop's thread.
func (w *workerLoop) carriesUrgent(b *batch) bool {
	return slices.ContainsFunc(b.rows, func(g *generation) bool { return w.isUrgent(w.byRow(g)) })
}

// aside runs bulk work f (a step, or a prefill) on the bulk lane and,
// until it returns, serves what arrives: a submit is admitted, and urgent
// requests at the head of the waiting order are prefilled on the loop's
// thread and send their first token at once; they join their batch after
// the step (joinPrefilled), which is why f must touch nothing but its own
// batch or sequence. Other frames (cancels, control) are held for
// handleHeld, so nothing changes a batch while it steps. A ring failure is
// returned only after f has returned.
func (w *workerLoop) aside(inbox <-chan inbound, f func()) error {
	w.bulk.work <- f
	var failed error
	for {
		select {
		case <-w.bulk.done:
			return failed
		case in := <-inbox:
			if failed != nil {
				continue
			}
			if in.typ != transport.FrameSubmit {
				w.held = append(w.held, in)
				continue
			}
			if err := w.admit(in); err != nil {
				failed = err
				continue
			}
			failed = w.startUrgent()
		}
	}
}

// startUrgent prefills the urgent requests at the head of the waiting
// order that fit, while a bulk step runs aside, and sends their first
// tokens.
func (w *workerLoop) startUrgent() error {
	for len(w.pending) > 0 && w.isUrgent(w.pending[0]) && w.fits(w.pending[0]) {
		r := w.pending[0]
		w.pending = w.pending[1:]
		r.span.AddEvent("prefill_started")
		kv, err := r.gen.prefill()
		if err != nil {
			if err := w.prefillFailed(r, err); err != nil {
				return err
			}
			continue
		}
		// Listed before emit, so that forget finds it if the first token
		// is also the last.
		w.prefilled = append(w.prefilled, &prefilledRun{r: r, kv: kv})
		if err := w.emit(r); err != nil {
			return err
		}
		if err := w.flushTokens(); err != nil {
			return err
		}
	}
	return nil
}

// joinPrefilled adds the requests prefilled beside a step to their
// batches.
func (w *workerLoop) joinPrefilled() {
	for _, p := range w.prefilled {
		p.r.batch.join(p.r.gen, p.kv)
	}
	clear(w.prefilled)
	w.prefilled = w.prefilled[:0]
}

// handleHeld acts on the frames held while a step ran aside, in order.
func (w *workerLoop) handleHeld() error {
	for len(w.held) > 0 {
		in := w.held[0]
		w.held = w.held[1:]
		if err := w.handle(in); err != nil {
			return err
		}
	}
	w.held = nil
	return nil
}

// fits reports whether r can join its batch within the KV budget: every
// batch is counted as if each of its rows grew to the longest reservation
// among them, which bounds the padded cache the batch can reach.
func (w *workerLoop) fits(r *running) bool {
	var total int64
	for _, b := range w.batches {
		rows, longest := len(b.rows), 0
		for _, g := range b.rows {
			longest = max(longest, g.reserve())
		}
		for _, p := range w.prefilled {
			if p.r.batch == b {
				rows++
				longest = max(longest, p.r.gen.reserve())
			}
		}
		if p := w.prefilling; p != nil && p.batch == b {
			rows++
			longest = max(longest, p.gen.reserve())
		}
		if b == r.batch {
			rows++
			longest = max(longest, r.gen.reserve())
		}
		total += b.m.kvBytes(rows, longest)
	}
	return total <= w.kvBudget
}

// emit samples r's next token from its latest logits and sends it, and
// ends r if that token finished it. Only ring failures are returned.
func (w *workerLoop) emit(r *running) error {
	if r == nil {
		return nil
	}
	tok, done := r.gen.next()
	w.stats.TokensGenerated += uint64(tok.Count)
	w.outTokens = append(w.outTokens, transport.TokenOut{ID: r.id, Token: tok})
	if r.phase == phasePrefill {
		// The prefill sampled the first token; from here the sequence
		// advances one token per decode step of its batch.
		r.span.End()
		r.phase = phaseDecode
		if done == nil {
			_, r.span = w.tracer.Start(r.ctx, phaseDecode)
			if r.span.IsRecording() {
				r.span.SetAttributes(attribute.Int64("h3infer.request_id", int64(r.id)),
					attribute.Int("h3infer.batch_rows", len(r.batch.rows)))
			}
		}
	}
	if done == nil {
		return nil
	}
	if r.span.IsRecording() {
		r.span.SetAttributes(attribute.Int("h3infer.completion_tokens", int(done.CompletionTokens)),
			attribute.String("h3infer.finish_reason", done.FinishReason))
	}
	w.forget(r)
	w.stats.SequencesFinished++
	return w.sendDone(r.id, *done)
}

// failBatch answers every sequence of a batch whose step failed with an
// error and drops them; the batch's cache can no longer be trusted.
func (w *workerLoop) failBatch(b *batch, err error) error {
	w.log.Error("decode step failed", "model", b.m.name, "rows", len(b.rows), "err", err)
	for _, g := range slices.Clone(b.rows) {
		r := w.byRow(g)
		if r == nil {
			continue
		}
		r.span.RecordError(err)
		r.span.SetStatus(codes.Error, "decode step failed")
		w.forget(r)
		w.stats.SequencesFinished++
		if err := w.sendError(r.id, infer.Error{Code: infer.CodeInternal, Message: "generation failed: " + err.Error()}); err != nil {
			return err
		}
	}
	b.close()
	return nil
}

// handle acts on one frame from the gateway. Problems with a request are
// answered on the ring; only ring failures are returned.
func (w *workerLoop) handle(in inbound) error {
	switch in.typ {
	case transport.FrameSubmit:
		return w.admit(in)
	case transport.FrameCancel:
		// The gateway has already forgotten the call, so nothing is sent.
		if r := w.byID[in.id]; r != nil {
			r.span.AddEvent("cancelled")
			w.forget(r)
			w.stats.SequencesCancelled++
		}
	case transport.FrameControl:
		return w.control(in)
	case 0:
		if in.loaded != nil {
			return w.loaded(in.loaded)
		}
	case transport.FrameHeartbeat:
	default:
		w.log.Warn("unexpected frame from gateway", "frame", in.typ.String(), "request_id", in.id)
	}
	return nil
}

func (w *workerLoop) admit(in inbound) error {
	reject := func(code, msg string) error {
		return w.sendError(in.id, infer.Error{Code: code, Message: msg})
	}
	if in.err != nil {
		return reject(infer.CodeInvalidRequest, "malformed submit: "+in.err.Error())
	}
	if w.byID[in.id] != nil {
		return reject(infer.CodeInvalidRequest, fmt.Sprintf("request id %d is already running", in.id))
	}
	if len(w.byID) >= w.slots {
		return reject(infer.CodeInternal, fmt.Sprintf("worker busy: all %d slots in use", w.slots))
	}
	m := w.models[in.submit.Model]
	if m == nil {
		return reject(infer.CodeModelNotFound, fmt.Sprintf("model %q is not served by this worker", in.submit.Model))
	}
	gen, err := m.newGeneration(&in.submit)
	if err != nil {
		if re, ok := errors.AsType[*RequestError](err); ok {
			return reject(re.Code, re.Message)
		}
		w.log.Error("start generation", "request_id", in.id, "err", err)
		return reject(infer.CodeInternal, err.Error())
	}
	if need := m.kvBytes(1, gen.reserve()); need > w.kvBudget {
		return reject(infer.CodeInvalidRequest, fmt.Sprintf(
			"the request may reach %d tokens, whose KV cache (%d bytes) exceeds this worker's budget of %d bytes; ask for fewer max_tokens",
			gen.reserve(), need, w.kvBudget))
	}
	w.arrivals++
	r := &running{id: in.id, urgency: in.submit.Urgency, class: in.submit.Class, arrival: w.arrivals, gen: gen,
		ctx: context.Background(), phase: phasePrefill}
	if tp := in.submit.TraceParent; tp != "" {
		r.ctx = propagation.TraceContext{}.Extract(r.ctx, propagation.MapCarrier{"traceparent": tp})
	}
	_, r.span = w.tracer.Start(r.ctx, phasePrefill)
	if r.span.IsRecording() {
		r.span.SetAttributes(attribute.Int64("h3infer.request_id", int64(in.id)),
			attribute.String("h3infer.model", in.submit.Model),
			attribute.Int("h3infer.prompt_tokens", len(gen.prompt)),
			attribute.Int("h3infer.urgency", int(in.submit.Urgency)))
	}
	for _, b := range w.batches {
		if b.m == m {
			r.batch = b
		}
	}
	// Most urgent first, then oldest; arrivals only grow, so the new one
	// goes after every equal.
	i, _ := slices.BinarySearchFunc(w.pending, r, func(a, b *running) int {
		if a.urgency != b.urgency {
			return int(a.urgency) - int(b.urgency)
		}
		return cmp.Compare(a.arrival, b.arrival)
	})
	w.pending = slices.Insert(w.pending, i, r)
	w.byID[in.id] = r
	w.byGen[gen] = r
	w.stats.SequencesStarted++
	return nil
}

// forget drops r wherever it is: its batch row at once (freeing the slot
// for the next step) or its place in the waiting order.
func (w *workerLoop) forget(r *running) {
	delete(w.byID, r.id)
	delete(w.byGen, r.gen)
	r.span.End()
	if r.gen.row >= 0 {
		r.batch.leave(r.gen)
		return
	}
	if i := slices.Index(w.pending, r); i >= 0 {
		w.pending = slices.Delete(w.pending, i, i+1)
	}
	w.prefilled = slices.DeleteFunc(w.prefilled, func(p *prefilledRun) bool { return p.r == r })
}

func (w *workerLoop) sendStats() error {
	w.stats.Active = uint32(len(w.byID))
	return w.end.SendStats(w.stats)
}

// closeAll drops every sequence; the models are closed by RunWorker,
// draining ones here.
func (w *workerLoop) closeAll() {
	for _, r := range w.byID {
		r.span.AddEvent("worker stopped")
		r.span.End()
	}
	for _, b := range w.batches {
		b.close()
	}
	for m := range w.draining {
		if err := m.Close(); err != nil {
			w.log.Warn("close model", "model", m.name, "err", err)
		}
	}
	w.draining = nil
	w.pending, w.byID, w.byGen, w.prefilled, w.held = nil, nil, nil, nil, nil
}

// flushTokens sends the queued token frames in one publish.
func (w *workerLoop) flushTokens() error {
	if len(w.outTokens) == 0 {
		return nil
	}
	err := w.end.SendTokens(w.outTokens)
	clear(w.outTokens)
	w.outTokens = w.outTokens[:0]
	return err
}

// sendDone and sendError end a request after the tokens queued before it,
// so its frames stay in order.
func (w *workerLoop) sendDone(id uint64, d infer.Done) error {
	if err := w.flushTokens(); err != nil {
		return err
	}
	return w.end.SendDone(id, d)
}

func (w *workerLoop) sendError(id uint64, e infer.Error) error {
	if err := w.flushTokens(); err != nil {
		return err
	}
	return w.end.SendError(id, e)
}
