package workerpool_test

import (
	"context"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"h3infer/engine"
	"h3infer/infer"
	"h3infer/ort"
	"h3infer/workerconf"
	"h3infer/workerpool"
)

// metric reads one worker's sample of a pool metric.
func metric(t *testing.T, reg *prometheus.Registry, name, worker string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "worker" && l.GetValue() == worker {
					if c := m.GetCounter(); c != nil {
						return c.GetValue()
					}
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	t.Fatalf("no metric %s{worker=%q}", name, worker)
	return 0
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type callResult struct {
	text string
	done *infer.Done
	err  *infer.Error
}

func drain(t *testing.T, c infer.Call) callResult {
	t.Helper()
	var r callResult
	var b strings.Builder
	timeout := time.After(60 * time.Second)
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				r.text = b.String()
				return r
			}
			b.WriteString(ev.Token.Text)
			if ev.Done != nil {
				r.done = ev.Done
			}
			if ev.Err != nil {
				r.err = ev.Err
			}
		case <-timeout:
			t.Fatal("call did not end")
		}
	}
}

func firstToken(t *testing.T, c infer.Call) {
	t.Helper()
	select {
	case ev := <-c.Events():
		if ev.Done != nil || ev.Err != nil {
			t.Fatalf("first event: %+v, want a token", ev)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("call sent no token")
	}
}

func TestPool(t *testing.T) {
	dir, lib := workerpool.DemoModelForTest(t)
	ref := loadReference(t, dir, "demo")
	t.Setenv(workerpool.WorkerEnvForTest, "1")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	goroutines := runtime.NumGoroutine()

	reg := prometheus.NewRegistry()
	p, err := workerpool.New(workerpool.Config{
		Workers:    2,
		Executable: exe,
		Worker: workerconf.Settings{
			Models:        []workerconf.Model{{Name: "demo", Dir: dir}},
			ORTLib:        lib,
			Slots:         2,
			StatsInterval: 10 * time.Millisecond,
		},
		RestartBackoff: 50 * time.Millisecond,
		StopGrace:      5 * time.Second,
		Registerer:     reg,
	}, workerpool.LoggerForTest(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			p.Close()
		}
	}()
	if err := p.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if got := p.Models(); len(got) != 1 || got[0].Name != "demo" || got[0].ContextLength != ref.m.Info().ContextLength {
		t.Errorf("Models() = %+v", got)
	}
	workers := p.Processes()
	if len(workers) != 2 || workers[0].ID() != 0 || workers[1].ID() != 1 || workers[0].Slots() != 2 {
		t.Fatalf("workers = %d, ids %d %d, slots %d", len(workers), workers[0].ID(), workers[1].ID(), workers[0].Slots())
	}

	t.Run("tokens match Generate", func(t *testing.T) {
		submits := []*infer.Request{
			{Model: "demo", Prompt: "The gateway ", MaxTokens: 40},
			{Model: "demo", Prompt: "The worker ", MaxTokens: 40, Temperature: 0.8, Seed: 9, HasSeed: true},
		}
		var wg sync.WaitGroup
		for i, s := range submits {
			c, err := workers[i].Open(uint64(10+i), s)
			if err != nil {
				t.Fatal(err)
			}
			wg.Go(func() {
				got := drain(t, c)
				text, done, err := ref.generate(s)
				if err != nil {
					t.Error(err)
					return
				}
				if got.done == nil || got.text != text || *got.done != done {
					t.Errorf("worker %d gave %q %+v (err %+v), Generate %q %+v", i, got.text, got.done, got.err, text, done)
				}
			})
		}
		wg.Wait()
	})

	long := &infer.Request{Model: "demo", Prompt: "The ", Temperature: 1, Seed: 3, HasSeed: true}
	requireLong(t, ref, long)

	t.Run("cancel", func(t *testing.T) {
		c, err := workers[0].Open(20, long)
		if err != nil {
			t.Fatal(err)
		}
		firstToken(t, c)
		c.Cancel()
		waitFor(t, "the cancel to be counted", func() bool {
			return metric(t, reg, "h3infer_worker_sequences_cancelled_total", "0") == 1
		})
	})

	t.Run("killed worker restarts", func(t *testing.T) {
		w := workers[1]
		c, err := w.Open(30, long)
		if err != nil {
			t.Fatal(err)
		}
		firstToken(t, c)
		waitFor(t, "stats from worker 1", func() bool {
			return metric(t, reg, "h3infer_worker_tokens_generated_total", "1") > 0
		})
		tokensBefore := metric(t, reg, "h3infer_worker_tokens_generated_total", "1")
		pid := w.PID()
		if pid == 0 {
			t.Fatal("no pid for a ready worker")
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		if got := drain(t, c); got.err == nil || got.done != nil {
			t.Errorf("call on the killed worker ended with %+v, want an error event", got)
		}
		if _, err := w.Open(31, long); err == nil {
			t.Error("Open succeeded on a dead worker")
		}
		if err := p.WaitReady(ctx); err != nil {
			t.Fatal(err)
		}
		if newPID := w.PID(); newPID == pid || newPID == 0 {
			t.Errorf("pid after restart %d, before %d", newPID, pid)
		}
		if got := metric(t, reg, "h3infer_worker_restarts_total", "1"); got != 1 {
			t.Errorf("restarts = %v, want 1", got)
		}
		if got := metric(t, reg, "h3infer_worker_ready", "1"); got != 1 {
			t.Errorf("ready gauge = %v, want 1", got)
		}
		if got := metric(t, reg, "h3infer_worker_tokens_generated_total", "1"); got < tokensBefore {
			t.Errorf("tokens counter went back from %v to %v", tokensBefore, got)
		}
		c2, err := w.Open(32, &infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 5})
		if err != nil {
			t.Fatal(err)
		}
		if got := drain(t, c2); got.done == nil {
			t.Errorf("restarted worker answered %+v", got)
		}
	})

	pids := []int{workers[0].PID(), workers[1].PID()}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	for _, pid := range pids {
		// Close reaped them, so the pids are gone.
		if pid <= 0 {
			t.Errorf("worker pid %d before Close", pid)
		} else if err := syscall.Kill(pid, 0); err == nil {
			t.Errorf("worker process %d still exists after Close", pid)
		}
	}
	waitFor(t, "the pool's goroutines to end", func() bool { return runtime.NumGoroutine() <= goroutines })
}

func TestPoolStartFails(t *testing.T) {
	dir, lib := workerpool.DemoModelForTest(t)
	p, err := workerpool.New(workerpool.Config{
		Executable: "/nonexistent/h3infer",
		Worker:     workerconf.Settings{Models: []workerconf.Model{{Name: "demo", Dir: dir}}, ORTLib: lib},
	}, workerpool.LoggerForTest(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "/nonexistent/h3infer") {
		t.Errorf("Start = %v, want an error naming the executable", err)
	}
	p.Close()
}

func TestPoolConfigErrors(t *testing.T) {
	_, err := workerpool.New(workerpool.Config{Workers: -1, RestartBackoff: -time.Second}, workerpool.LoggerForTest(t))
	if err == nil {
		t.Fatal("invalid config accepted")
	}
	for _, want := range []string{"workers.count: must be 1..64, got -1", "restart_backoff", "models: at least one"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

// TestPoolKillsBrokenWorkers: a worker that stops beating its heartbeat, or
// that writes garbage into its ring, is killed and restarted, and the
// request it held ends with worker_lost; the gateway process carries on.
func TestPoolKillsBrokenWorkers(t *testing.T) {
	tests := map[string]struct {
		metric string
		exit   string
	}{
		"hang":    {metric: "h3infer_worker_hangs_total", exit: "heartbeat stalled"},
		"garbage": {metric: "h3infer_worker_ring_failures_total", exit: "ring corrupt"},
	}
	for mode, tt := range tests {
		t.Run(mode, func(t *testing.T) {
			dir, lib := workerpool.DemoModelForTest(t)
			t.Setenv(workerpool.WorkerEnvForTest, "1")
			t.Setenv(workerpool.MisbehaveEnvForTest, mode)
			goroutines := runtime.NumGoroutine()
			p, reg := startTestBinaryPool(t, dir, lib, 400*time.Millisecond)
			w := p.Processes()[0]
			waitFor(t, "the worker to be ready", w.Ready)
			firstPID := w.PID()
			if mode == "hang" {
				// A request held by a hung worker must not hang with it.
				c, err := w.Open(1, &infer.Request{Model: "demo", Prompt: "x", MaxTokens: 4})
				if err != nil {
					t.Fatal(err)
				}
				if r := drain(t, c); r.err == nil || r.err.Code != infer.CodeWorkerLost {
					t.Errorf("request on the hung worker: got %+v, want a worker_lost error", r)
				}
			}
			waitFor(t, "a kill and a restart", func() bool {
				return metric(t, reg, tt.metric, "0") >= 1 && metric(t, reg, "h3infer_worker_restarts_total", "0") >= 1
			})
			waitFor(t, "a new process", func() bool { pid := w.PID(); return pid != 0 && pid != firstPID })
			if processAlive(firstPID) {
				t.Errorf("broken worker %d still runs", firstPID)
			}
			st := p.Status()[0]
			if !strings.Contains(st.LastExit, tt.exit) || st.Restarts < 1 {
				t.Errorf("status %+v: want restarts >= 1 and last exit mentioning %q", st, tt.exit)
			}
			if err := p.Close(); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the pool's goroutines to end", func() bool { return runtime.NumGoroutine() <= goroutines })
		})
	}
}

// reference is a model loaded in the test process, to tell what a worker
// must answer. engine.Generate drives the model's one batch, so calls take
// turns.
type reference struct {
	mu sync.Mutex
	m  *ort.Model
}

func loadReference(t *testing.T, dir, name string) *reference {
	t.Helper()
	m, err := ort.LoadModel(dir, ort.Options{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return &reference{m: m}
}

func (r *reference) generate(s *infer.Request) (string, infer.Done, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return engine.Generate(context.Background(), r.m, s)
}

// requireLong checks that s makes a long generation, so that a test can
// act on it while it runs.
func requireLong(t *testing.T, ref *reference, s *infer.Request) {
	t.Helper()
	const enough = 500
	capped := *s
	capped.MaxTokens = enough
	_, done, err := ref.generate(&capped)
	if err != nil {
		t.Fatal(err)
	}
	if done.FinishReason != infer.FinishLength {
		t.Fatalf("precondition: %+v stops after %d tokens, want at least %d", s, done.CompletionTokens, enough)
	}
}

func processAlive(pid int) bool {
	return syscall.Kill(pid, 0) == nil
}

// startTestBinaryPool starts a pool of one worker whose process is this
// test binary (TestMain plays the worker the environment asks for), with a
// quick restart and the given hang timeout. The caller closes the pool.
func startTestBinaryPool(t *testing.T, dir, lib string, hang time.Duration) (*workerpool.Pool, *prometheus.Registry) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	p, err := workerpool.New(workerpool.Config{
		Workers:        1,
		Executable:     exe,
		Worker:         workerconf.Settings{Models: []workerconf.Model{{Name: "demo", Dir: dir}}, ORTLib: lib},
		RestartBackoff: 20 * time.Millisecond,
		HangTimeout:    hang,
		Registerer:     reg,
	}, workerpool.LoggerForTest(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	return p, reg
}
