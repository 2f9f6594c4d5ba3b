package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"h3infer/certs"
	"h3infer/gateway"
	"h3infer/infer"
	"h3infer/internal/onnxgen"
	"h3infer/internal/qlogdir"
	"h3infer/ort"
	"h3infer/priority"
	"h3infer/ratelimit"
	"h3infer/scheduler"
	"h3infer/tlsbind"
	"h3infer/tokenizers"
	"h3infer/upstream"
	"h3infer/workerconf"
	"h3infer/workerpool"
)

func runServe(ctx context.Context, args []string, stdout io.Writer, log *slog.Logger) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	configPath := fs.String("config", "", "config file (JSON); see docs/CONFIG.md")
	listen := fs.String("listen", "", "host:port for HTTP/3 (UDP) and HTTP/1.1+2 (TCP) (default 127.0.0.1:8443)")
	admin := fs.String("admin", "", "host:port for /healthz, /readyz and /metrics (default 127.0.0.1:9090)")
	stateDir := fs.String("state-dir", "", "directory for certificates and the demo model (default .h3infer)")
	workers := fs.Int("workers", 0, "number of worker processes (default: one per CPU over workers.intra_op_threads, at most 8)")
	qlog := fs.String("qlog", "", "write a qlog trace of every QUIC connection into this directory, header values redacted (docs/OBSERVABILITY.md)")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	// load reads the file again on SIGHUP, with the same flags winning.
	load := func() (Config, error) {
		cfg, err := loadConfig(*configPath)
		if err != nil {
			return cfg, err
		}
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "listen":
				cfg.Listen = *listen
			case "admin":
				cfg.Admin = *admin
			case "state-dir":
				cfg.StateDir = *stateDir
			case "workers":
				cfg.Workers.Count = *workers
			case "qlog":
				cfg.QlogDir = *qlog
			}
		})
		if v := os.Getenv("ONNXRUNTIME_LIB"); v != "" {
			cfg.ONNXRuntimeLib = v
		}
		cfg = cfg.withDefaults()
		if err := cfg.validate(); err != nil {
			return cfg, fmt.Errorf("invalid configuration:\n%w", err)
		}
		return cfg, nil
	}
	cfg, err := load()
	if err != nil {
		return err
	}
	return serve(ctx, cfg, load, stdout, log)
}

func serve(ctx context.Context, cfg Config, load func() (Config, error), stdout io.Writer, log *slog.Logger) error {
	// Registered before anything else so that a SIGHUP during start-up is
	// handled once ready instead of killing the process.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	// One per worker's response-ring receiver (procs.go).
	addProcs(cfg.Workers.Count)
	setGC(cfg.Gateway, log)

	src, err := newCertSource(cfg, log)
	if err != nil {
		return err
	}
	tlsCfg := &tls.Config{GetCertificate: src.getCertificate, MinVersion: tls.VersionTLS12}
	dev := src.dev
	if err := ensureDemo(cfg, log); err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable for workers: %w", err)
	}
	ortLibPath := onnxRuntimeLib(cfg.ONNXRuntimeLib, exe)

	tp, stopTracing, err := newTracerProvider(ctx, "h3infer", cfg.Tracing.OTLPEndpoint)
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), tracingFlushTimeout)
		defer cancel()
		if err := stopTracing(sctx); err != nil {
			log.Warn("tracing: flush on exit", "err", err)
		}
	}()
	var workerEnv []string
	if cfg.Tracing.OTLPEndpoint != "" {
		workerEnv = append(workerEnv, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="+cfg.Tracing.OTLPEndpoint)
	}
	limits, closeLimits, err := rateLimits(cfg)
	if err != nil {
		return err
	}
	defer closeLimits()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	keyStore, closeKeys, err := sessionKeyStore(cfg)
	if err != nil {
		return err
	}
	defer closeKeys()
	keys, err := keyStore.Current(ctx, time.Now(), time.Duration(cfg.ZeroRTT.Every))
	if err != nil {
		return err
	}
	tlsCfg.SetSessionTicketKeys(keys.TicketKeys)
	quicKeys := &gateway.QUICKeys{TokenGenerator: keys.TokenGeneratorKey, StatelessReset: keys.StatelessResetKey}

	auth, devToken, closeAuth, err := authSetup(cfg, reg, log)
	if err != nil {
		return err
	}
	defer closeAuth()

	var pool *workerpool.Pool
	registry, err := workerpool.NewRegistry(workerpool.RegistryConfig{
		Root:         cfg.ModelRepository.Dir,
		Static:       cfg.Models,
		Poll:         time.Duration(cfg.ModelRepository.Poll),
		AutoPromote:  *cfg.ModelRepository.AutoPromote,
		DrainTimeout: time.Duration(cfg.ModelRepository.DrainTimeout),
		Registerer:   reg,
		MemoryLimit:  cfg.ModelRepository.MemoryLimitBytes,
		Workers:      cfg.Workers.Count,
		KVCacheBytes: cfg.Workers.KVCacheBytes,
	}, poolLoader{&pool}, log)
	if err != nil {
		return err
	}
	models, err := registry.Initial()
	if err != nil {
		return err
	}
	for i, m := range models {
		// A GPU provider asked for outright fails here, naming what is
		// missing, rather than in workers restarting forever.
		if err := ort.ProbeProvider(m.Provider, ortLibPath); err != nil {
			return fmt.Errorf("models[%d] (%s): %w", i, m.Name, err)
		}
	}
	poolCfg := cfg.pool()
	poolCfg.Executable = exe
	poolCfg.Worker.Models = models
	poolCfg.Worker.ORTLib = ortLibPath
	poolCfg.Registerer = reg
	poolCfg.Env = workerEnv
	pool, err = workerpool.New(poolCfg, log)
	if err != nil {
		return err
	}
	schedCfg := cfg.Scheduler
	schedCfg.Classes = *cfg.Priority
	remote, err := upstream.NewSet(cfg.Upstreams, upstream.Options{
		Log:            log,
		Registerer:     reg,
		TracerProvider: tp,
		CallBuffer:     cfg.Workers.CallBuffer,
		FirstID:        firstUpstreamID,
	})
	if err != nil {
		return err
	}
	// Closed after the drain: it cancels what still runs upstream.
	defer remote.Close()
	kinds := backends(localWorkers{registry, pool}, remote)
	sched, err := scheduler.New(schedCfg, kinds, log)
	if err != nil {
		return err
	}
	reg.MustRegister(newSchedulerCollector(sched))
	adminTok, adminTokFile, err := adminToken(cfg)
	if err != nil {
		return err
	}
	if adminTokFile != "" {
		log.Info("admin listener is not on loopback: it demands the admin token", "file", adminTokFile)
	}
	// The section as the file wrote it (with the addresses of its top
	// level), and what only serve builds.
	gwCfg := cfg.Gateway.Config
	gwCfg.TLS = tlsCfg
	gwCfg.Registry = reg
	gwCfg.TracerProvider = tp
	gwCfg.RateLimits = limits
	gwCfg.AdminToken = adminTok
	gwCfg.Status = func() any { return adminStatus(sched) }
	gwCfg.Auth = auth
	gwCfg.QUICKeys = quicKeys
	gwCfg.Router = router{registry}
	tokCache, err := tokenizers.New(0)
	if err != nil {
		return err
	}
	gwCfg.Tokenizers = tokenizerSource{registry, tokCache}
	gwCfg.ModelAdmin = registry
	gwCfg.TCPProtos = src.tcpProtos()
	if cfg.QlogDir != "" {
		if gwCfg.QUICTracer, err = qlogdir.New(cfg.QlogDir, log); err != nil {
			return err
		}
		log.Info("writing a qlog trace of every QUIC connection", "dir", cfg.QlogDir)
	}
	gw, err := gateway.New(gwCfg, gateway.FromScheduler(sched), kinds, log)
	if err != nil {
		return err
	}
	rotation := cfg.ZeroRTT.RotatorConfig
	rotation.Store = keyStore
	rotation.Apply = func(k *certs.SessionKeys) { gw.SetSessionTicketKeys(k.TicketKeys) }
	rotator, _, err := certs.NewRotator(ctx, rotation, log)
	if err != nil {
		return err
	}
	// The watchers stop last, after the workers.
	watch, stopWatch := context.WithCancel(context.Background())
	var watchers sync.WaitGroup
	defer func() {
		stopWatch()
		watchers.Wait()
	}()
	watchers.Go(func() { src.reloader.Watch(watch, time.Duration(cfg.TLS.WatchInterval)) })
	watchers.Go(func() { rotator.Run(watch) })

	if err := pool.Start(ctx); err != nil {
		return err
	}
	if err := gw.Start(); err != nil {
		pool.Close()
		return err
	}
	log.Info("listening", "addr", gw.Addr(), "admin", gw.AdminAddr(), "workers", cfg.Workers.Count)

	readyErr := pool.WaitReady(ctx)
	if readyErr == nil {
		log.Info("ready", "models", len(models))
		printNextSteps(stdout, gw.Addr(), gw.AdminAddr(), adminTokFile, dev, devToken, cfg.StateDir,
			sizing(cfg, runtime.NumCPU(), slices.ContainsFunc(models, workerconf.Model.WantsGPU), pool.Status()))
	}
	var regWatch sync.WaitGroup
	regWatch.Go(func() { registry.Watch(ctx) })
	for running := true; running; {
		select {
		case <-ctx.Done():
			running = false
		case <-hup:
			cfg = reloadConfig(cfg, load, reloadTargets{sched: sched, limits: gw, models: registry, certs: src, upstreams: remote}, log)
		}
	}
	grace := time.Duration(cfg.Gateway.ShutdownGrace)
	log.Info("draining", "grace", grace)

	// Stop accepting and let streams finish, then stop what fed them.
	// Connections a client kept open past the grace are not a failure of
	// ours: they are logged, and the exit status stays 0.
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := gw.Shutdown(sctx); err != nil {
		log.Warn("gateway shutdown incomplete", "err", err)
	}
	registry.Close()
	regWatch.Wait()
	sched.Close()
	err = pool.Close()
	log.Info("drained")
	if readyErr != nil && !errors.Is(readyErr, context.Canceled) {
		err = errors.Join(err, readyErr)
	}
	return err
}

// ensureDemo writes the demo model as version 1 of "demo", and a small
// encoder as version 1 of "encoder" (so that /v1/embeddings answers out of
// the box), into the default repository, <state_dir>/models, when that
// repository is in use and holds no model yet.
func ensureDemo(cfg Config, log *slog.Logger) error {
	if len(cfg.Models) > 0 || cfg.ModelRepository.Dir != filepath.Join(cfg.StateDir, "models") {
		return nil
	}
	entries, err := os.ReadDir(cfg.ModelRepository.Dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("model repository: %w", err)
	}
	if len(entries) > 0 {
		return nil
	}
	dir := filepath.Join(cfg.ModelRepository.Dir, "demo", "1")
	if err := onnxgen.Write(dir, onnxgen.DefaultOptions()); err != nil {
		return fmt.Errorf("write demo model: %w", err)
	}
	log.Info("wrote demo model", "dir", dir)
	dir = filepath.Join(cfg.ModelRepository.Dir, demoEncoder, "1")
	if err := onnxgen.WriteEncoder(dir, onnxgen.EncoderOptions{}); err != nil {
		return fmt.Errorf("write demo encoder: %w", err)
	}
	log.Info("wrote demo encoder", "dir", dir)
	return nil
}

// demoEncoder is the name the demo repository serves its encoder under.
const demoEncoder = "encoder"

// poolLoader lets the registry, made before the pool whose first models
// it chooses, reach the pool once it exists.
type poolLoader struct{ pool **workerpool.Pool }

func (p poolLoader) LoadModel(ctx context.Context, s workerconf.Model) error {
	return (*p.pool).LoadModel(ctx, s)
}
func (p poolLoader) UnloadModel(ctx context.Context, name string) error {
	return (*p.pool).UnloadModel(ctx, name)
}
func (p poolLoader) Models() []infer.ModelInfo { return (*p.pool).Models() }
func (p poolLoader) Ready() bool               { return (*p.pool).Ready() }

// onnxRuntimeLib picks the ONNX Runtime library: the configured path (which
// ONNXRUNTIME_LIB has already overridden), else the one `make` fetched next
// to the binary, else a bare name for the dynamic loader's search path.
func onnxRuntimeLib(configured, exe string) string {
	if configured != "" {
		return configured
	}
	fetched := filepath.Join(filepath.Dir(exe), "..", ".cache", "onnxruntime", "1.24.1", "libonnxruntime.so.1")
	if _, err := os.Stat(fetched); err == nil {
		if abs, err := filepath.Abs(fetched); err == nil {
			return abs
		}
	}
	return "libonnxruntime.so.1"
}

// printNextSteps tells a person what to run next. It prints no secret:
// the credential's secret part and the admin token stay in their files.
func printNextSteps(w io.Writer, addr, adminAddr, adminTokFile string, dev *certs.Dev, devToken, stateDir, sizing string) {
	host, port, _ := net.SplitHostPort(addr)
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	base := "https://" + net.JoinHostPort(host, port)
	self := os.Args[0]
	var b strings.Builder
	fmt.Fprintf(&b, "\nh3infer is ready.\n")
	fmt.Fprintf(&b, "  URL (HTTP/3 on UDP, HTTP/1.1+2 on TCP): %s/\n", base)
	fmt.Fprintf(&b, "  Admin (healthz, readyz, metrics):      http://%s/\n", adminAddr)
	if adminTokFile != "" {
		fmt.Fprintf(&b, "  Admin token (not on loopback) in:     %s\n", adminTokFile)
	}
	b.WriteString(sizing)
	caFlag := ""
	if dev != nil {
		fmt.Fprintf(&b, "  CA certificate:                        %s\n", dev.CAFile)
		fmt.Fprintf(&b, "  Leaf SPKI pin (for Chromium):          %s\n", dev.SPKI)
		caFlag = " --ca " + dev.CAFile
	}
	authFlag := ""
	if devToken != "" {
		bearer, _, _ := tlsbind.SplitCredential(devToken)
		fmt.Fprintf(&b, "  Dev credential (chat reads it here):   %s\n", devTokenFile(stateDir))
		fmt.Fprintf(&b, "  Its bearer part (for curl and browsers): %s\n", bearer)
		authFlag = fmt.Sprintf(" -H 'Authorization: Bearer %s'", bearer)
	}
	fmt.Fprintf(&b, "\nStream a completion over HTTP/3:\n")
	fmt.Fprintf(&b, "  %s chat --url %s --state-dir %s%s \"The gateway\"\n", self, base, stateDir, caFlag)
	if dev != nil {
		fmt.Fprintf(&b, "\nOver TCP with curl:\n")
		fmt.Fprintf(&b, "  curl --cacert %s%s %s/v1/models\n", dev.CAFile, authFlag, base)
		fmt.Fprintf(&b, "\nThe chat page in Chromium over HTTP/3 (see README):\n")
		fmt.Fprintf(&b, "  chromium --user-data-dir=$(mktemp -d) --enable-quic --origin-to-force-quic-on=%s --ignore-certificate-errors-spki-list=%s '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost' %s/\n",
			net.JoinHostPort(host, port), dev.SPKI, base)
	}
	fmt.Fprintln(&b)
	io.WriteString(w, b.String())
}

// sizing says how many workers run and how many sequences each runs at
// once, and why: a user who never set workers.count or workers.slots
// learns what was chosen for them and which key changes it. cpus and gpu
// are what workerpool.AutoWorkers was given; workers is the pool's status
// once every worker is ready.
func sizing(cfg Config, cpus int, gpu bool, workers []workerpool.ProcessStatus) string {
	var b strings.Builder
	w := cfg.Workers
	threads := w.IntraOpThreads
	switch {
	case w.Count != workerpool.AutoWorkers(cpus, threads, gpu):
		fmt.Fprintf(&b, "  Workers: %d (workers.count)\n", w.Count)
	case gpu:
		fmt.Fprintf(&b, "  Workers: %d (a model runs on a GPU, which one worker uses whole; workers.count)\n", w.Count)
	case threads == 1:
		fmt.Fprintf(&b, "  Workers: %d (one per CPU of %d, at most %d; workers.count)\n", w.Count, cpus, workerpool.MaxAutoWorkers)
	default:
		fmt.Fprintf(&b, "  Workers: %d (one per %d CPUs of %d, as workers.intra_op_threads asks, at most %d; workers.count)\n",
			w.Count, threads, cpus, workerpool.MaxAutoWorkers)
	}
	if len(workers) == 0 {
		return b.String()
	}
	// Every worker runs the same settings and models, so the first
	// speaks for all; a restart re-derives, the banner is printed once.
	st := workers[0]
	reserve := ""
	if r := *cfg.Scheduler.UrgentReserve; r > 0 {
		reserve = fmt.Sprintf(", %d kept for urgent requests (scheduler.urgent_reserve)", r)
	}
	if w.Slots != 0 {
		fmt.Fprintf(&b, "  Slots: %d per worker (workers.slots)%s\n", st.Slots, reserve)
		return b.String()
	}
	fmt.Fprintf(&b, "  Slots: %d per worker%s:\n", st.Slots, reserve)
	fmt.Fprintf(&b, "    %d sequences at full context fit in workers.kv_cache_bytes (%s), taken within %d..%d\n",
		st.SlotsFit, bytesIEC(w.KVCacheBytes), workerconf.MinAutoSlots, workerconf.MaxAutoSlots)
	return b.String()
}

// bytesIEC writes n in the largest binary unit that keeps it whole, or in
// bytes.
func bytesIEC(n int64) string {
	for _, u := range []struct {
		shift int
		name  string
	}{{30, "GiB"}, {20, "MiB"}, {10, "KiB"}} {
		if n >= 1<<u.shift && n%(1<<u.shift) == 0 {
			return fmt.Sprintf("%d %s", n>>u.shift, u.name)
		}
	}
	return fmt.Sprintf("%d bytes", n)
}

// tracingFlushTimeout bounds the export of the last spans at exit.
const tracingFlushTimeout = 5 * time.Second

// rateLimits is the configured limits with their store, connecting to
// Redis when the limits are shared. The returned function closes the
// client.
func rateLimits(cfg Config) (gateway.RateLimits, func(), error) {
	c := cfg.RateLimits
	rl := c.RateLimits
	if c.Store != "redis" {
		return rl, func() {}, nil
	}
	client, err := openRedis(cfg, "rate_limits")
	if err != nil {
		return rl, nil, err
	}
	rl.Store = ratelimit.NewRedis(client, c.RedisPrefix)
	return rl, func() { client.Close() }, nil
}

// adminStatus is the queue part of /debug/state; the workers part comes
// from the catalog.
func adminStatus(sched *scheduler.Scheduler) any {
	st := sched.Stats()
	return struct {
		Queued          int                  `json:"queued"`
		QueuedByUrgency [priority.Levels]int `json:"queued_by_urgency"`
		Running         int                  `json:"running"`
	}{st.Queued, st.QueuedByUrgency, st.Running}
}

// schedulerCollector exports the scheduler's queues at scrape time, from
// one Stats snapshot so that depth and running agree. The queue depth is
// the scheduler's own count by urgency: it sees aging, tenant limits and
// requests that leave the queue, which a count kept around Submit in the
// gateway would only approximate.
type schedulerCollector struct {
	sched                    *scheduler.Scheduler
	depth, running           *prometheus.Desc
	refusals                 *prometheus.Desc
	predicted, lastPredicted *prometheus.Desc
	queueDelay               *prometheus.Desc
}

func newSchedulerCollector(s *scheduler.Scheduler) *schedulerCollector {
	return &schedulerCollector{
		sched: s,
		depth: prometheus.NewDesc("h3infer_queue_depth",
			"Completion requests waiting for a worker slot, by the urgency they were given.", []string{"urgency"}, nil),
		running: prometheus.NewDesc("h3infer_scheduler_running_requests",
			"Worker slots in use.", nil, nil),
		refusals: prometheus.NewDesc("h3infer_scheduler_refusals_total",
			"Requests the scheduler refused for want of capacity (503), by reason: queue_full, predicted_delay or queue_delay.", []string{"reason"}, nil),
		predicted: prometheus.NewDesc("h3infer_queue_delay_predicted_seconds",
			"Queue waits predicted for arriving requests that found no free slot, admitted or refused (delay admission, measured models).", nil, nil),
		lastPredicted: prometheus.NewDesc("h3infer_queue_delay_predicted_last_seconds",
			"The latest queue wait predicted for an arriving request.", nil, nil),
		queueDelay: prometheus.NewDesc("h3infer_scheduler_queue_delay_seconds",
			"How long dispatched requests waited in the scheduler's queue, 0 for those dispatched on arrival.", nil, nil),
	}
}

func (c *schedulerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.depth
	ch <- c.running
	ch <- c.refusals
	ch <- c.predicted
	ch <- c.lastPredicted
	ch <- c.queueDelay
}

func (c *schedulerCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.sched.Stats()
	for u, n := range st.QueuedByUrgency {
		ch <- prometheus.MustNewConstMetric(c.depth, prometheus.GaugeValue, float64(n), strconv.Itoa(u))
	}
	ch <- prometheus.MustNewConstMetric(c.running, prometheus.GaugeValue, float64(st.Running))
	for reason, n := range st.Refusals {
		ch <- prometheus.MustNewConstMetric(c.refusals, prometheus.CounterValue, float64(n), reason)
	}
	ch <- prometheus.MustNewConstSummary(c.predicted, st.Predictions, st.PredictedDelaySum.Seconds(), nil)
	ch <- prometheus.MustNewConstMetric(c.lastPredicted, prometheus.GaugeValue, st.LastPredictedDelay.Seconds())
	ch <- prometheus.MustNewConstSummary(c.queueDelay, st.QueueDelays, st.QueueDelaySum.Seconds(), nil)
}

var (
	_ gateway.Router         = (*workerpool.Registry)(nil)
	_ gateway.ModelAdmin     = (*workerpool.Registry)(nil)
	_ workerpool.ModelLoader = (*workerpool.Pool)(nil)
)
