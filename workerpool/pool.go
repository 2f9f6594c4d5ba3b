package workerpool

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"h3infer/infer"
	"h3infer/transport"
	"h3infer/workerconf"
)

// ErrNotReady is returned by Process.Open while the worker's process is
// starting, restarting or gone.
var ErrNotReady = errors.New("workerpool: worker not ready")

// Config configures a Pool. Each field is the config key its comment
// names, with that key's default: the zero value of a field means the
// documented default, and Validate names the key of a value out of range.
type Config struct {
	// Workers is the number of worker processes (workers.count); 0 means
	// AutoWorkers of this machine's CPUs.
	Workers int
	// Executable is the h3infer binary run as `EXECUTABLE worker ARGS`;
	// empty means this process's own executable.
	Executable string
	// Worker are the settings every worker process runs with; LoadModel
	// and UnloadModel change the models of the processes started later.
	Worker workerconf.Settings
	// RingSize is the size in bytes of each ring (workers.ring_bytes); 0
	// means 1 MiB.
	RingSize int
	// RestartBackoff is the wait before restarting a worker that exited;
	// it doubles on each failure in a row up to MaxRestartBackoff and
	// starts over once a worker reports Ready. 0 means 200ms.
	RestartBackoff time.Duration
	// StopGrace is how long Close waits for a worker to exit after asking
	// it to before killing it; 0 means 5s.
	StopGrace time.Duration
	// HangTimeout is how long a ready worker's heartbeat may stand still
	// before the worker is killed as hung and restarted
	// (workers.hang_timeout); 0 means 10s.
	HangTimeout time.Duration
	// CallBuffer bounds the unread events of one request; a request whose
	// client falls further behind is cancelled (workers.call_buffer). 0
	// means transport.DefaultCallBuffer.
	CallBuffer int
	// Registerer, when set, receives the pool's metrics.
	Registerer prometheus.Registerer
	// Env is added to the environment workers inherit, as KEY=VALUE; the
	// wiring passes tracing settings this way so that workers export their
	// own spans.
	Env []string
}

// Defaults and bounds of Config.
const (
	MaxWorkers = 64
	// MaxAutoWorkers bounds the count AutoWorkers derives from the CPUs:
	// each worker holds its own copy of model.onnx and its own KV budget,
	// so a large machine should be sized by choice, not by default.
	MaxAutoWorkers        = 8
	DefaultRingSize       = 1 << 20
	MinRingSize           = 64 << 10
	MaxRingSize           = 1 << 30
	MaxCallBuffer         = 1 << 20
	DefaultRestartBackoff = 200 * time.Millisecond
	MaxRestartBackoff     = 10 * time.Second
	DefaultStopGrace      = 5 * time.Second
	DefaultHangTimeout    = 10 * time.Second
	MinHangTimeout        = 100 * time.Millisecond
)

// AutoWorkers is how many worker processes run when workers.count is 0:
// one per intraOp CPUs, so that the workers' ONNX Runtime threads take
// each of the cpus once (a worker's decode loop keeps one busy), at
// least 1 and at most MaxAutoWorkers. The gateway shares those CPUs; the
// workers' bulk work runs at workers.nice so that it yields to the
// gateway. With a GPU it is 1: a worker's sessions share their device,
// and a second process on the same GPU only splits its memory.
func AutoWorkers(cpus, intraOp int, gpu bool) int {
	if gpu {
		return 1
	}
	return min(max(cpus/max(intraOp, 1), 1), MaxAutoWorkers)
}

// WithDefaults returns c with every zero value replaced by its default,
// its worker settings' included.
func (c Config) WithDefaults() Config {
	if c.Workers == 0 {
		c.Workers = AutoWorkers(runtime.NumCPU(), c.Worker.WithDefaults().IntraOpThreads,
			slices.ContainsFunc(c.Worker.Models, workerconf.Model.WantsGPU))
	}
	if c.RingSize == 0 {
		c.RingSize = DefaultRingSize
	}
	if c.CallBuffer == 0 {
		c.CallBuffer = transport.DefaultCallBuffer
	}
	if c.RestartBackoff == 0 {
		c.RestartBackoff = DefaultRestartBackoff
	}
	if c.StopGrace == 0 {
		c.StopGrace = DefaultStopGrace
	}
	if c.HangTimeout == 0 {
		c.HangTimeout = DefaultHangTimeout
	}
	c.Worker = c.Worker.WithDefaults()
	return c
}

// Validate reports every value out of range at once, each naming its
// config key, the worker settings' included; zero values stand for their
// defaults and pass.
func (c Config) Validate() error {
	d := c.WithDefaults()
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, a...)))
	}
	if d.Workers < 1 || d.Workers > MaxWorkers {
		bad("workers.count", "must be 1..%d, got %d", MaxWorkers, d.Workers)
	}
	if r := d.RingSize; r < MinRingSize || r > MaxRingSize || r&(r-1) != 0 {
		bad("workers.ring_bytes", "must be a power of two from %d to %d, got %d", MinRingSize, MaxRingSize, r)
	}
	if d.CallBuffer < 1 || d.CallBuffer > MaxCallBuffer {
		bad("workers.call_buffer", "must be 1..%d, got %d", MaxCallBuffer, d.CallBuffer)
	}
	if d.HangTimeout < MinHangTimeout {
		bad("workers.hang_timeout", "must be at least %s, got %s", MinHangTimeout, d.HangTimeout)
	}
	if d.RestartBackoff < 0 {
		bad("restart_backoff", "must be >= 0, got %s", d.RestartBackoff)
	}
	if d.StopGrace < 0 {
		bad("stop_grace", "must be >= 0, got %s", d.StopGrace)
	}
	if err := c.Worker.Validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Worker states, as Status and the admin listener report them.
const (
	StateStarting   = "starting"   // process started, model loading
	StateReady      = "ready"      // taking requests
	StateRestarting = "restarting" // process gone, waiting out the backoff
	StateStopped    = "stopped"    // the pool is closing
)

// Pool starts the worker processes, one shared-memory segment each,
// restarts them when they exit and exports their counters. It lives in the
// gateway process.
type Pool struct {
	cfg     Config
	log     *slog.Logger
	workers []*Process
	metrics *poolCollector
	// gpu reads the workers' device memory; nil when no model asks for a
	// GPU or the host has no NVIDIA driver, and then the metric is absent.
	gpu *gpuMemory

	mu      sync.Mutex
	started bool
	closed  bool
	changed chan struct{}      // closed and replaced whenever a worker's readiness changes
	models  []workerconf.Model // what a starting process loads; LoadModel and UnloadModel change it

	controlMu  sync.Mutex // one LoadModel or UnloadModel at a time
	controlSeq uint64     // under controlMu

	closing   chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
}

// Process is the stable handle of one worker slot of a Pool: it survives
// the restarts of the worker process behind it, and it is what the
// scheduler dispatches to.
type Process struct {
	id   int
	pool *Pool

	mu       sync.Mutex
	end      *transport.GatewayEnd // nil while no process runs
	seg      *transport.Segment    // the running process's rings; nil while none runs
	wakeBase uint64                // gateway-side ring wake-ups of processes that exited
	pid      int
	ready    bool
	slots    int
	slotsFit int
	models   []infer.ModelInfo
	stats    transport.Stats // latest report of the running process
	base     transport.Stats // totals of the processes that exited
	restarts uint64
	state    string
	lastExit string // why the last process ended, "" before any did
	hangs    uint64 // processes killed for a stalled heartbeat
	corrupt  uint64 // processes killed for breaking their ring
	stalled  time.Duration
}

// ProcessStatus is a snapshot of one worker slot for the admin listener.
type ProcessStatus struct {
	ID    int    `json:"id"`
	PID   int    `json:"pid"`   // 0 while no process runs
	State string `json:"state"` // starting, ready, restarting, stopped
	Slots int    `json:"slots"`
	// SlotsFit is, when the worker derived its slots from its KV budget
	// (workers.slots 0), how many full-context sequences the budget
	// holds, before workerconf.AutoSlots bounded it; 0 when the slots
	// were configured.
	SlotsFit int    `json:"slots_fit,omitempty"`
	Restarts uint64 `json:"restarts"`
	LastExit string `json:"last_exit,omitempty"`
	// HeartbeatStalled is how long the running worker's heartbeat has
	// stood still, as of the last check; the admin listener's
	// /debug/state shows it as heartbeat_stalled_seconds.
	HeartbeatStalled time.Duration `json:"-"`
}

// MarshalJSON writes s as /debug/state shows it, with the heartbeat's
// stall in seconds.
func (s ProcessStatus) MarshalJSON() ([]byte, error) {
	type plain ProcessStatus
	return json.Marshal(struct {
		plain
		HeartbeatStalledSeconds float64 `json:"heartbeat_stalled_seconds"`
	}{plain(s), s.HeartbeatStalled.Seconds()})
}

// New checks cfg and prepares a pool; Start starts the processes.
func New(cfg Config, log *slog.Logger) (*Pool, error) {
	err := cfg.Validate()
	if len(cfg.Worker.Models) == 0 {
		err = errors.Join(err, errors.New("models: at least one is required"))
	}
	if err != nil {
		return nil, fmt.Errorf("pool config: %w", err)
	}
	cfg = cfg.WithDefaults()
	if cfg.Executable == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("pool: find own executable: %w", err)
		}
		cfg.Executable = exe
	}
	p := &Pool{cfg: cfg, log: log, changed: make(chan struct{}), closing: make(chan struct{}), models: slices.Clone(cfg.Worker.Models)}
	for i := range cfg.Workers {
		p.workers = append(p.workers, &Process{id: i, pool: p, state: StateStarting})
	}
	if slices.ContainsFunc(cfg.Worker.Models, workerconf.Model.WantsGPU) {
		var err error
		if p.gpu, err = openGPUMemory(); err != nil {
			log.Info("no gpu memory metrics", "err", err)
		}
	}
	p.metrics = newPoolCollector(p)
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(p.metrics); err != nil {
			return nil, fmt.Errorf("pool: register metrics: %w", err)
		}
	}
	return p, nil
}

// Start starts every worker process and returns once they are running,
// not necessarily ready (see WaitReady). ctx bounds only the starting;
// the processes live until Close. If a process cannot be started at all
// (say the executable is missing), Start stops the others and fails.
func (p *Pool) Start(ctx context.Context) error {
	p.mu.Lock()
	switch {
	case p.closed:
		p.mu.Unlock()
		return errors.New("pool: start after close")
	case p.started:
		p.mu.Unlock()
		return errors.New("pool: started twice")
	}
	p.started = true
	p.mu.Unlock()

	results := make(chan error, len(p.workers))
	for _, w := range p.workers {
		p.wg.Go(func() { p.supervise(w, results) })
	}
	var errs []error
	for range p.workers {
		select {
		case err := <-results:
			if err != nil {
				errs = append(errs, err)
			}
		case <-ctx.Done():
			errs = append(errs, fmt.Errorf("pool: start: %w", ctx.Err()))
		}
		if len(errs) > 0 {
			break
		}
	}
	if len(errs) > 0 {
		p.Close()
		return errors.Join(errs...)
	}
	return nil
}

// Processes returns one handle per worker index, the same across
// restarts.
func (p *Pool) Processes() []*Process { return append([]*Process(nil), p.workers...) }

// Status reports every worker slot's state, in index order.
func (p *Pool) Status() []ProcessStatus {
	out := make([]ProcessStatus, 0, len(p.workers))
	for _, w := range p.workers {
		w.mu.Lock()
		out = append(out, ProcessStatus{
			ID:               w.id,
			PID:              w.pid,
			State:            w.state,
			Slots:            w.slots,
			SlotsFit:         w.slotsFit,
			Restarts:         w.restarts,
			LastExit:         w.lastExit,
			HeartbeatStalled: w.stalled,
		})
		w.mu.Unlock()
	}
	return out
}

// Ready reports whether every worker has sent Ready.
func (p *Pool) Ready() bool {
	for _, w := range p.workers {
		if !w.Ready() {
			return false
		}
	}
	return true
}

// WaitReady waits until every worker is ready, ctx ends or the pool closes.
func (p *Pool) WaitReady(ctx context.Context) error {
	for {
		p.mu.Lock()
		ch, closed := p.changed, p.closed
		p.mu.Unlock()
		if closed {
			return errors.New("pool: closed")
		}
		if p.Ready() {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("pool: wait for workers to be ready: %w", ctx.Err())
		}
	}
}

// Models lists the models the ready workers serve, each name once.
func (p *Pool) Models() []infer.ModelInfo {
	var out []infer.ModelInfo
	seen := map[string]bool{}
	for _, w := range p.workers {
		w.mu.Lock()
		if w.ready {
			for _, m := range w.models {
				if !seen[m.Name] {
					seen[m.Name] = true
					out = append(out, m)
				}
			}
		}
		w.mu.Unlock()
	}
	return out
}

// Close stops the workers: it closes each ring (a worker exits cleanly
// when its ring closes) and sends SIGTERM, then SIGKILL after StopGrace;
// it reaps every process and waits for every goroutine of the pool. Open
// calls end with an error event.
func (p *Pool) Close() error {
	p.mu.Lock()
	p.closed = true
	p.notifyLocked()
	p.mu.Unlock()
	p.closeOnce.Do(func() { close(p.closing) })
	p.wg.Wait()
	if p.cfg.Registerer != nil {
		p.cfg.Registerer.Unregister(p.metrics)
	}
	return nil
}

func (p *Pool) notify() {
	p.mu.Lock()
	p.notifyLocked()
	p.mu.Unlock()
}

func (p *Pool) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// ID returns the worker's index in the pool.
func (w *Process) ID() int { return w.id }

// Ready reports whether the worker's current process has sent Ready and
// its ring still works. A ring that failed (a corrupt frame) fails its
// calls before the supervisor has killed the process; the closed end
// keeps the scheduler from re-dispatching those calls to the same worker.
func (w *Process) Ready() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.ready && w.end != nil && !w.end.Closed()
}

// Slots is how many sequences the worker runs at once, as its last Ready
// said; 0 before the first.
func (w *Process) Slots() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.slots
}

// Open sends s to the worker as request id. It fails with
// ErrNotReady unless the worker is ready. If the process dies, the
// call ends with an error event.
func (w *Process) Open(id uint64, s *infer.Request) (infer.Call, error) {
	return w.OpenSink(id, s, nil)
}

// currentPID is the pid of the worker's running process, 0 if none.
func (w *Process) currentPID() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pid
}

// supervise runs worker w's processes one after another until the pool
// closes. The first start's outcome goes to started.
//
// It holds its OS thread throughout: Pdeathsig fires when the thread that
// forked the child exits, not the process, so the forking thread must
// outlive the child.
func (p *Pool) supervise(w *Process, started chan<- error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	backoff := p.cfg.RestartBackoff
	first := true
	for {
		proc, err := p.launch(w)
		if first {
			started <- err
			first = false
			if err != nil {
				return
			}
		}
		if err != nil {
			p.log.Error("worker start failed", "worker", w.id, "err", err)
		} else {
			becameReady := p.watch(w, proc)
			if becameReady {
				backoff = p.cfg.RestartBackoff
			}
		}
		select {
		case <-p.closing:
			w.setState(StateStopped)
			return
		default:
		}
		w.mu.Lock()
		w.restarts++
		w.state = StateRestarting
		w.mu.Unlock()
		p.log.Info("restarting worker", "worker", w.id, "backoff", backoff)
		select {
		case <-p.closing:
			w.setState(StateStopped)
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, MaxRestartBackoff)
	}
}

// process is one running worker process and what serves it.
type process struct {
	cmd    *exec.Cmd
	seg    *transport.Segment
	end    *transport.GatewayEnd
	stdout *lineLog
	stderr *lineLog
}

// launch starts one process for w with a fresh segment.
func (p *Pool) launch(w *Process) (*process, error) {
	seg, err := transport.NewSegment(p.cfg.RingSize)
	if err != nil {
		return nil, fmt.Errorf("worker %d: create ring: %w", w.id, err)
	}
	wc := p.cfg.Worker
	p.mu.Lock()
	wc.Models = slices.Clone(p.models)
	p.mu.Unlock()
	args, err := wc.Args()
	if err != nil {
		seg.Close()
		return nil, fmt.Errorf("worker %d: %w", w.id, err)
	}
	cmd := exec.Command(p.cfg.Executable, append([]string{"worker"}, args...)...)
	// The first of ExtraFiles is workerconf.RingFD in the child.
	cmd.ExtraFiles = []*os.File{seg.File()}
	if len(p.cfg.Env) > 0 {
		cmd.Env = append(os.Environ(), p.cfg.Env...)
	}
	pr := &process{
		cmd:    cmd,
		seg:    seg,
		stdout: &lineLog{log: p.log, worker: w.id, stream: "stdout"},
		stderr: &lineLog{log: p.log, worker: w.id, stream: "stderr"},
	}
	cmd.Stdout, cmd.Stderr = pr.stdout, pr.stderr
	// Its own process group keeps a terminal's ^C away from the workers:
	// the gateway stops them in its shutdown order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	pr.end = transport.NewGatewayEnd(seg, transport.GatewayEndConfig{
		CallBuffer: p.cfg.CallBuffer,
		OnReady:    func(r transport.Ready) { w.setReady(r) },
		OnStats: func(s transport.Stats) {
			w.mu.Lock()
			w.stats = s
			w.mu.Unlock()
		},
		Log: p.log.With("worker", w.id),
	})
	if err := cmd.Start(); err != nil {
		seg.Close()
		return nil, fmt.Errorf("worker %d: start %s: %w", w.id, p.cfg.Executable, err)
	}
	w.mu.Lock()
	w.end, w.seg, w.pid, w.state, w.stalled = pr.end, pr.seg, cmd.Process.Pid, StateStarting, 0
	w.mu.Unlock()
	p.log.Info("worker started", "worker", w.id, "pid", cmd.Process.Pid)
	return pr, nil
}

func (w *Process) setState(state string) {
	w.mu.Lock()
	w.state = state
	w.mu.Unlock()
}

func (w *Process) setReady(r transport.Ready) {
	w.mu.Lock()
	w.ready = true
	w.state = StateReady
	w.slots, w.slotsFit = int(r.Slots), int(r.SlotsFit)
	w.models = append([]infer.ModelInfo(nil), r.Models...)
	w.mu.Unlock()
	w.pool.log.Info("worker ready", "worker", w.id, "pid", r.PID, "slots", r.Slots, "slots_fit", r.SlotsFit)
	w.pool.notify()
}

// watch serves pr until its process exits and cleans up after it: open
// calls end with an error event the moment the process is gone. It asks
// the process to stop when the pool closes or when the worker closes its
// ring without exiting, and kills it after the grace. It kills it at once
// when the ring turns out corrupt or the heartbeat stalls past
// HangTimeout. It reports whether the process ever became ready.
func (p *Pool) watch(w *Process, pr *process) bool {
	runDone := make(chan struct{})
	var runErr error // read only after runDone is closed
	var run sync.WaitGroup
	run.Go(func() {
		defer close(runDone)
		runErr = pr.end.Run()
	})
	exited := make(chan error, 1)
	run.Go(func() { exited <- pr.cmd.Wait() })

	// A stalled heartbeat is looked for a few times per HangTimeout, so a
	// hang is caught within about 1.25 of it.
	beat := pr.end.HeartbeatWatch()
	hangCheck := time.NewTicker(p.cfg.HangTimeout / 4)
	defer hangCheck.Stop()
	var killedFor string
	killNow := func(why string) {
		if err := pr.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			p.log.Warn("kill worker", "worker", w.id, "err", err)
		}
		killedFor = why
	}

	var kill <-chan time.Time
	closing, ended := p.closing, runDone
	var waitErr error
wait:
	for {
		select {
		case waitErr = <-exited:
			break wait
		case now := <-hangCheck.C:
			if !w.Ready() {
				continue // loading a model is allowed to take long
			}
			stalled := beat.Stalled(now)
			w.mu.Lock()
			w.stalled = stalled
			w.mu.Unlock()
			if stalled > p.cfg.HangTimeout {
				p.log.Error("worker heartbeat stalled; killing it", "worker", w.id, "pid", pr.cmd.Process.Pid, "stalled", stalled)
				w.mu.Lock()
				w.hangs++
				w.mu.Unlock()
				killNow(fmt.Sprintf("killed: heartbeat stalled for %s", stalled.Round(time.Millisecond)))
				hangCheck.Stop()
			}
		case <-closing:
			closing = nil
			pr.end.Close()
			if err := pr.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
				p.log.Warn("signal worker", "worker", w.id, "err", err)
			}
			kill = time.After(p.cfg.StopGrace)
		case <-ended:
			ended = nil
			if runErr != nil && !errors.Is(runErr, transport.ErrClosed) {
				// A worker that breaks its ring cannot be trusted with
				// another frame: no grace.
				p.log.Error("worker ring failed; killing the worker", "worker", w.id, "pid", pr.cmd.Process.Pid, "err", runErr)
				w.mu.Lock()
				w.corrupt++
				w.mu.Unlock()
				killNow(fmt.Sprintf("killed: %v", runErr))
				continue
			}
			// The worker closed its ring; a healthy one exits right after.
			if kill == nil {
				kill = time.After(p.cfg.StopGrace)
			}
		case <-kill:
			kill = nil
			p.log.Warn("worker did not exit in time; killing it", "worker", w.id, "pid", pr.cmd.Process.Pid)
			if err := pr.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
				p.log.Warn("kill worker", "worker", w.id, "err", err)
			}
		}
	}
	// Not ready before the open calls fail, so that whoever sees a call
	// fail also sees the worker gone.
	w.mu.Lock()
	wasReady := w.ready
	w.wakeBase += pr.seg.Stats().Wakeups
	w.end, w.seg, w.pid, w.ready, w.stalled = nil, nil, 0, false, 0
	w.lastExit = fmt.Sprint(waitErr)
	if killedFor != "" {
		w.lastExit = killedFor
	}
	w.mu.Unlock()
	p.notify()
	pr.end.Close()
	run.Wait()
	if err := pr.seg.Close(); err != nil {
		p.log.Warn("close worker ring", "worker", w.id, "err", err)
	}
	pr.stdout.flush()
	pr.stderr.flush()
	// Run has returned, so no report of the dead process can follow.
	w.mu.Lock()
	w.base = addStats(w.base, w.stats)
	w.stats = transport.Stats{}
	w.mu.Unlock()
	level := slog.LevelWarn
	select {
	case <-p.closing:
		level = slog.LevelInfo
	default:
	}
	p.log.Log(context.Background(), level, "worker exited", "worker", w.id, "pid", pr.cmd.Process.Pid, "status", fmt.Sprint(waitErr))
	return wasReady
}

func addStats(a, b transport.Stats) transport.Stats {
	return transport.Stats{
		TokensGenerated:    a.TokensGenerated + b.TokensGenerated,
		SequencesStarted:   a.SequencesStarted + b.SequencesStarted,
		SequencesFinished:  a.SequencesFinished + b.SequencesFinished,
		SequencesCancelled: a.SequencesCancelled + b.SequencesCancelled,
		Prefills:           a.Prefills + b.Prefills,
		PrefillTokens:      a.PrefillTokens + b.PrefillTokens,
	}
}

// ringStats reads the running process's ring occupancy, with the wake-ups
// counted over all its processes so far; zero occupancy while none runs.
func (w *Process) ringStats() transport.RingStats {
	w.mu.Lock()
	defer w.mu.Unlock()
	var st transport.RingStats
	if w.seg != nil {
		st = w.seg.Stats()
	}
	st.Wakeups += w.wakeBase
	return st
}

// totals are the worker's counters over all its processes so far.
func (w *Process) totals() (transport.Stats, uint64, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := addStats(w.base, w.stats)
	s.Active = w.stats.Active
	return s, w.restarts, w.ready
}

// lineLog forwards a child's output to the pool's logger, one record per
// line. exec.Cmd writes to it from one goroutine per stream and waits for
// that goroutine in Wait, so flush after Wait sees everything.
type lineLog struct {
	log    *slog.Logger
	worker int
	stream string
	buf    []byte
}

// maxLine bounds a line held while waiting for its newline.
const maxLine = 64 << 10

func (l *lineLog) Write(b []byte) (int, error) {
	l.buf = append(l.buf, b...)
	for {
		i := bytes.IndexByte(l.buf, '\n')
		if i < 0 {
			break
		}
		l.emit(l.buf[:i])
		l.buf = l.buf[i+1:]
	}
	if len(l.buf) > maxLine {
		l.emit(l.buf)
		l.buf = nil
	}
	l.buf = append([]byte(nil), l.buf...)
	return len(b), nil
}

func (l *lineLog) flush() {
	if len(l.buf) > 0 {
		l.emit(l.buf)
		l.buf = nil
	}
}

func (l *lineLog) emit(line []byte) {
	if len(line) == 0 {
		return
	}
	l.log.Info("worker output", "worker", l.worker, "stream", l.stream, "line", string(line))
}
