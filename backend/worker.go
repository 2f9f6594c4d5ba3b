package backend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"sync"
	"time"

	"h3infer/transport"
)

// ModelSpec names a model directory a worker serves and the name it is
// served under.
type ModelSpec struct {
	Name string
	Dir  string
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
	// Slots is how many sequences the worker generates at once; 0 means 4.
	Slots int
	// IntraOpThreads is ONNX Runtime's intra-op thread count per model;
	// 0 means 1.
	IntraOpThreads int
	// StatsInterval is how often the worker reports its counters; 0 means
	// 100ms.
	StatsInterval time.Duration
}

// Defaults of WorkerConfig.
const (
	DefaultSlots         = 4
	DefaultStatsInterval = 100 * time.Millisecond
)

// Args is the command line, after the `worker` subcommand, that gives a
// worker process this configuration. cmd/h3infer/worker.go parses it.
func (c WorkerConfig) Args() []string {
	args := []string{"--ring-fd=" + strconv.Itoa(c.RingFD)}
	for _, m := range c.Models {
		args = append(args, "--model="+m.Name+"="+m.Dir)
	}
	if c.ORTLib != "" {
		args = append(args, "--onnxruntime-lib="+c.ORTLib)
	}
	if c.Slots != 0 {
		args = append(args, "--slots="+strconv.Itoa(c.Slots))
	}
	if c.IntraOpThreads != 0 {
		args = append(args, "--intra-op-threads="+strconv.Itoa(c.IntraOpThreads))
	}
	if c.StatsInterval != 0 {
		args = append(args, "--stats-interval="+c.StatsInterval.String())
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
	}
	if c.Slots < 0 {
		errs = append(errs, fmt.Errorf("slots: must be >= 0, got %d", c.Slots))
	}
	if c.IntraOpThreads < 0 {
		errs = append(errs, fmt.Errorf("intra-op-threads: must be >= 0, got %d", c.IntraOpThreads))
	}
	if c.StatsInterval < 0 {
		errs = append(errs, fmt.Errorf("stats-interval: must be >= 0, got %s", c.StatsInterval))
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
	return c
}

// RunWorker is the worker process: it maps the ring from cfg.RingFD, loads
// the models, announces itself with Ready and then serves submits until
// the ring closes (a clean exit, nil) or ctx ends. Up to cfg.Slots
// sequences run at once, each advanced one token per round in turn.
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

	if err := InitRuntime(cfg.ORTLib); err != nil {
		return fmt.Errorf("worker: %w", err)
	}
	w := &workerLoop{
		end:    end,
		slots:  cfg.Slots,
		models: map[string]*Model{},
		byID:   map[uint64]*running{},
		log:    log,
	}
	defer w.closeAll()
	ready := transport.Ready{PID: uint32(os.Getpid()), Slots: uint32(cfg.Slots)}
	for _, spec := range cfg.Models {
		m, err := LoadModel(spec.Dir, ModelOptions{Name: spec.Name, IntraOpThreads: cfg.IntraOpThreads})
		if err != nil {
			return fmt.Errorf("worker: %w", err)
		}
		w.models[spec.Name] = m
		ready.Models = append(ready.Models, m.Info())
		log.Info("model loaded", "model", spec.Name, "dir", spec.Dir, "context_length", m.cfg.ContextLength, "layers", m.layers)
	}
	if err := end.SendReady(ready); err != nil {
		return closedOK(fmt.Errorf("worker: send ready: %w", err))
	}
	log.Info("worker ready", "pid", ready.PID, "slots", cfg.Slots)

	inbox := make(chan inbound, 64)
	recvErr := make(chan error, 1)
	stopRecv := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { receive(end, inbox, recvErr, stopRecv) })
	defer func() {
		end.Close() // wakes a Recv sleeping on the ring
		close(stopRecv)
		wg.Wait()
	}()
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
	typ    transport.FrameType
	id     uint64
	submit transport.Submit
	err    error
}

// receive runs Recv until the ring closes or stop is closed. A blocking
// futex wait ties up an OS thread, so it keeps its own.
func receive(end *transport.WorkerEnd, inbox chan<- inbound, recvErr chan<- error, stop <-chan struct{}) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for {
		f, err := end.Recv()
		if err != nil {
			recvErr <- err
			return
		}
		in := inbound{typ: f.Type, id: f.ID}
		if f.Type == transport.FrameSubmit {
			in.submit, in.err = transport.DecodeSubmit(f.Payload)
		}
		select {
		case inbox <- in:
		case <-stop:
			return
		}
	}
}

// running is one admitted request.
type running struct {
	id  uint64
	gen *generation
}

// workerLoop is the generation loop's state; only serve's goroutine
// touches it.
type workerLoop struct {
	end    *transport.WorkerEnd
	slots  int
	models map[string]*Model
	active []*running // in round-robin order
	byID   map[uint64]*running
	stats  transport.Stats
	log    *slog.Logger
}

func (w *workerLoop) serve(ctx context.Context, inbox <-chan inbound, recvErr <-chan error, every time.Duration) error {
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	for {
		w.end.Beat() // the gateway's hang detection watches this
		if len(w.active) == 0 {
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
		if len(w.active) == 0 {
			if err := w.sendStats(); err != nil {
				return err
			}
		}
	}
}

// round advances every active sequence by one token, taking in frames
// before each step so a cancel stops its sequence before the next step.
func (w *workerLoop) round(inbox <-chan inbound) error {
	for _, r := range append([]*running(nil), w.active...) {
		if err := w.drain(inbox); err != nil {
			return err
		}
		if w.byID[r.id] != r {
			continue // cancelled meanwhile
		}
		if err := w.step(r); err != nil {
			return err
		}
	}
	return nil
}

func (w *workerLoop) drain(inbox <-chan inbound) error {
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

// step generates one token of r and sends it. Only ring failures are
// returned; a failed sequence is answered with an error frame.
func (w *workerLoop) step(r *running) error {
	tok, done, err := r.gen.step()
	if err != nil {
		w.log.Error("generation failed", "request_id", r.id, "err", err)
		w.remove(r)
		w.stats.SequencesFinished++
		return w.end.SendError(r.id, transport.Error{Code: transport.CodeInternal, Message: "generation failed: " + err.Error()})
	}
	w.stats.TokensGenerated += uint64(tok.Count)
	if err := w.end.SendToken(r.id, tok); err != nil {
		return err
	}
	if done == nil {
		return nil
	}
	w.remove(r)
	w.stats.SequencesFinished++
	return w.end.SendDone(r.id, *done)
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
			w.remove(r)
			w.stats.SequencesCancelled++
		}
	case transport.FrameHeartbeat:
	default:
		w.log.Warn("unexpected frame from gateway", "frame", in.typ.String(), "request_id", in.id)
	}
	return nil
}

func (w *workerLoop) admit(in inbound) error {
	reject := func(code, msg string) error {
		return w.end.SendError(in.id, transport.Error{Code: code, Message: msg})
	}
	if in.err != nil {
		return reject(transport.CodeInvalidRequest, "malformed submit: "+in.err.Error())
	}
	if w.byID[in.id] != nil {
		return reject(transport.CodeInvalidRequest, fmt.Sprintf("request id %d is already running", in.id))
	}
	if len(w.active) >= w.slots {
		return reject(transport.CodeInternal, fmt.Sprintf("worker busy: all %d slots in use", w.slots))
	}
	m := w.models[in.submit.Model]
	if m == nil {
		return reject(transport.CodeModelNotFound, fmt.Sprintf("model %q is not served by this worker", in.submit.Model))
	}
	gen, err := m.newGeneration(&in.submit)
	if err != nil {
		if re, ok := errors.AsType[*RequestError](err); ok {
			return reject(re.Code, re.Message)
		}
		w.log.Error("start generation", "request_id", in.id, "err", err)
		return reject(transport.CodeInternal, err.Error())
	}
	r := &running{id: in.id, gen: gen}
	w.active = append(w.active, r)
	w.byID[in.id] = r
	w.stats.SequencesStarted++
	return nil
}

func (w *workerLoop) remove(r *running) {
	delete(w.byID, r.id)
	for i, a := range w.active {
		if a == r {
			w.active = append(w.active[:i], w.active[i+1:]...)
			break
		}
	}
	r.gen.close()
}

func (w *workerLoop) sendStats() error {
	w.stats.Active = uint32(len(w.active))
	return w.end.SendStats(w.stats)
}

func (w *workerLoop) closeAll() {
	for _, r := range w.active {
		r.gen.close()
	}
	w.active, w.byID = nil, nil
	for name, m := range w.models {
		if err := m.Close(); err != nil {
			w.log.Warn("close model", "model", name, "err", err)
		}
	}
}
