package backend

import (
	"bytes"
	"context"
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
)

// ErrWorkerNotReady is returned by Worker.Open while the worker's process
// is starting, restarting or gone.
var ErrWorkerNotReady = errors.New("backend: worker not ready")

// PoolConfig configures a Pool. Zero values mean the documented defaults.
type PoolConfig struct {
	// Workers is the number of worker processes; 0 means 2.
	Workers int
	// Executable is the h3infer binary run as `EXECUTABLE worker ARGS`;
	// empty means this process's own executable.
	Executable string
	// Worker is the template of every worker's configuration; the pool
	// sets RingFD.
	Worker WorkerConfig
	// RingSize is the size in bytes of each ring; 0 means the transport
	// default.
	RingSize int
	// RestartBackoff is the wait before restarting a worker that exited;
	// it doubles on each failure in a row up to MaxRestartBackoff and
	// starts over once a worker reports Ready. 0 means 200ms.
	RestartBackoff time.Duration
	// StopGrace is how long Close waits for a worker to exit after asking
	// it to before killing it; 0 means 5s.
	StopGrace time.Duration
	// HangTimeout is how long a ready worker's heartbeat may stand still
	// before the worker is killed as hung and restarted; 0 means 10s.
	HangTimeout time.Duration
	// CallBuffer bounds the unread events of one request; a request whose
	// client falls further behind is cancelled. 0 means the transport
	// default.
	CallBuffer int
	// Registerer, when set, receives the pool's metrics.
	Registerer prometheus.Registerer
	// Env is added to the environment workers inherit, as KEY=VALUE; the
	// wiring passes tracing settings this way so that workers export their
	// own spans.
	Env []string
}

// Defaults of PoolConfig.
const (
	DefaultWorkers        = 2
	DefaultRestartBackoff = 200 * time.Millisecond
	MaxRestartBackoff     = 10 * time.Second
	DefaultStopGrace      = 5 * time.Second
	DefaultHangTimeout    = 10 * time.Second
)

// Worker states, as Status and the admin listener report them.
const (
	StateStarting   = "starting"   // process started, model loading
	StateReady      = "ready"      // taking requests
	StateRestarting = "restarting" // process gone, waiting out the backoff
	StateStopped    = "stopped"    // the pool is closing
)

// workerFD is the descriptor the ring has in the child: the first of
// exec.Cmd.ExtraFiles.
const workerFD = 3

// Pool starts the worker processes, one shared-memory segment each,
// restarts them when they exit and exports their counters. It lives in the
// gateway process.
type Pool struct {
	cfg     PoolConfig
	log     *slog.Logger
	workers []*Worker
	metrics *poolCollector
	// gpu reads the workers' device memory; nil when no model asks for a
	// GPU or the host has no NVIDIA driver, and then the metric is absent.
	gpu *gpuMemory

	mu      sync.Mutex
	started bool
	closed  bool
	changed chan struct{} // closed and replaced whenever a worker's readiness changes
	models  []ModelSpec   // what a starting process loads; LoadModel and UnloadModel change it

	controlMu  sync.Mutex // one LoadModel or UnloadModel at a time
	controlSeq uint64     // under controlMu

	closing   chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
}

// Worker is the stable handle of one worker slot of a Pool; it survives
// the restarts of the process behind it.
type Worker struct {
	id   int
	pool *Pool

	mu       sync.Mutex
	end      *transport.GatewayEnd // nil while no process runs
	seg      *transport.Segment    // the running process's rings; nil while none runs
	wakeBase uint64                // gateway-side ring wake-ups of processes that exited
	pid      int
	ready    bool
	slots    int
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

// WorkerStatus is a snapshot of one worker slot for the admin listener.
type WorkerStatus struct {
	ID       int
	PID      int // 0 while no process runs
	State    string
	Slots    int
	Restarts uint64
	LastExit string
	// HeartbeatStalled is how long the running worker's heartbeat has
	// stood still, as of the last check.
	HeartbeatStalled time.Duration
}

// NewPool checks cfg and prepares a pool; Start starts the processes.
func NewPool(cfg PoolConfig, log *slog.Logger) (*Pool, error) {
	var errs []error
	if cfg.Workers < 0 {
		errs = append(errs, fmt.Errorf("workers: must be >= 0, got %d", cfg.Workers))
	}
	if cfg.RestartBackoff < 0 {
		errs = append(errs, fmt.Errorf("restart_backoff: must be >= 0, got %s", cfg.RestartBackoff))
	}
	if cfg.StopGrace < 0 {
		errs = append(errs, fmt.Errorf("stop_grace: must be >= 0, got %s", cfg.StopGrace))
	}
	if cfg.HangTimeout < 0 {
		errs = append(errs, fmt.Errorf("hang_timeout: must be >= 0, got %s", cfg.HangTimeout))
	}
	if cfg.CallBuffer < 0 {
		errs = append(errs, fmt.Errorf("call_buffer: must be >= 0, got %d", cfg.CallBuffer))
	}
	if cfg.RingSize < 0 {
		errs = append(errs, fmt.Errorf("ring_size: must be >= 0, got %d", cfg.RingSize))
	}
	w := cfg.Worker
	w.RingFD = workerFD
	if err := w.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("worker: %w", err))
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("pool config: %w", errors.Join(errs...))
	}
	cfg.Worker = w
	if cfg.Workers == 0 {
		cfg.Workers = DefaultWorkers
	}
	if cfg.RestartBackoff == 0 {
		cfg.RestartBackoff = DefaultRestartBackoff
	}
	if cfg.StopGrace == 0 {
		cfg.StopGrace = DefaultStopGrace
	}
	if cfg.HangTimeout == 0 {
		cfg.HangTimeout = DefaultHangTimeout
	}
	if cfg.Executable == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("pool: find own executable: %w", err)
		}
		cfg.Executable = exe
	}
	p := &Pool{cfg: cfg, log: log, changed: make(chan struct{}), closing: make(chan struct{}), models: slices.Clone(cfg.Worker.Models)}
	for i := range cfg.Workers {
		p.workers = append(p.workers, &Worker{id: i, pool: p, state: StateStarting})
	}
	for _, m := range cfg.Worker.Models {
		if m.Provider == ProviderCUDA || m.Provider == ProviderTensorRT || m.Provider == ProviderAuto {
			var err error
			if p.gpu, err = openGPUMemory(); err != nil {
				log.Info("no gpu memory metrics", "err", err)
			}
			break
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

// Workers returns one handle per worker index, the same across restarts.
func (p *Pool) Workers() []*Worker { return append([]*Worker(nil), p.workers...) }

// Status reports every worker slot's state, in index order.
func (p *Pool) Status() []WorkerStatus {
	out := make([]WorkerStatus, 0, len(p.workers))
	for _, w := range p.workers {
		w.mu.Lock()
		out = append(out, WorkerStatus{
			ID:               w.id,
			PID:              w.pid,
			State:            w.state,
			Slots:            w.slots,
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
func (w *Worker) ID() int { return w.id }

// Ready reports whether the worker's current process has sent Ready and
// its ring still works. A ring that failed (a corrupt frame) fails its
// calls before the supervisor has killed the process; the closed end
// keeps the scheduler from re-dispatching those calls to the same worker.
func (w *Worker) Ready() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.ready && w.end != nil && !w.end.Closed()
}

// Slots is how many sequences the worker runs at once, as its last Ready
// said; 0 before the first.
func (w *Worker) Slots() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.slots
}

// Open sends s to the worker as request id. It fails with
// ErrWorkerNotReady unless the worker is ready. If the process dies, the
// call ends with an error event.
func (w *Worker) Open(id uint64, s *infer.Request) (infer.Call, error) {
	w.mu.Lock()
	end, ready := w.end, w.ready
	w.mu.Unlock()
	if !ready || end == nil {
		return nil, fmt.Errorf("worker %d: open request %d: %w", w.id, id, ErrWorkerNotReady)
	}
	call, err := end.Open(id, s)
	if err != nil {
		return nil, fmt.Errorf("worker %d: %w", w.id, err)
	}
	return call, nil
}

// currentPID is the pid of the worker's running process, 0 if none.
func (w *Worker) currentPID() int {
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
func (p *Pool) supervise(w *Worker, started chan<- error) {
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
func (p *Pool) launch(w *Worker) (*process, error) {
	seg, err := transport.NewSegment(p.cfg.RingSize)
	if err != nil {
		return nil, fmt.Errorf("worker %d: create ring: %w", w.id, err)
	}
	wc := p.cfg.Worker
	p.mu.Lock()
	wc.Models = slices.Clone(p.models)
	p.mu.Unlock()
	args := append([]string{"worker"}, wc.Args()...)
	cmd := exec.Command(p.cfg.Executable, args...)
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

func (w *Worker) setState(state string) {
	w.mu.Lock()
	w.state = state
	w.mu.Unlock()
}

func (w *Worker) setReady(r transport.Ready) {
	w.mu.Lock()
	w.ready = true
	w.state = StateReady
	w.slots = int(r.Slots)
	w.models = append([]infer.ModelInfo(nil), r.Models...)
	w.mu.Unlock()
	w.pool.log.Info("worker ready", "worker", w.id, "pid", r.PID, "slots", r.Slots)
	w.pool.notify()
}

// watch serves pr until its process exits and cleans up after it: open
// calls end with an error event the moment the process is gone. It asks
// the process to stop when the pool closes or when the worker closes its
// ring without exiting, and kills it after the grace. It kills it at once
// when the ring turns out corrupt or the heartbeat stalls past
// HangTimeout. It reports whether the process ever became ready.
func (p *Pool) watch(w *Worker, pr *process) bool {
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
	}
}

// ringStats reads the running process's ring occupancy, with the wake-ups
// counted over all its processes so far; zero occupancy while none runs.
func (w *Worker) ringStats() transport.RingStats {
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
func (w *Worker) totals() (transport.Stats, uint64, bool) {
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
