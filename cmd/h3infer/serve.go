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
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"h3infer/backend"
	"h3infer/certs"
	"h3infer/gateway"
	"h3infer/internal/onnxgen"
	"h3infer/scheduler"
)

// shutdownGrace bounds how long in-flight streams may run after SIGTERM.
const shutdownGrace = 10 * time.Second

func runServe(ctx context.Context, args []string, stdout io.Writer, log *slog.Logger) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	configPath := fs.String("config", "", "config file (JSON); see docs/CONFIG.md")
	listen := fs.String("listen", "", "host:port for HTTP/3 (UDP) and HTTP/1.1+2 (TCP) (default 127.0.0.1:8443)")
	admin := fs.String("admin", "", "host:port for /healthz, /readyz and /metrics (default 127.0.0.1:9090)")
	stateDir := fs.String("state-dir", "", "directory for certificates and the demo model (default .h3infer)")
	workers := fs.Int("workers", 0, "number of worker processes (default 2)")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	cfg, err := loadConfig(*configPath)
	if err != nil {
		return err
	}
	// Flags win over the file.
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
		}
	})
	if v := os.Getenv("ONNXRUNTIME_LIB"); v != "" {
		cfg.ONNXRuntimeLib = v
	}
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return fmt.Errorf("invalid configuration:\n%w", err)
	}
	return serve(ctx, cfg, stdout, log)
}

func serve(ctx context.Context, cfg Config, stdout io.Writer, log *slog.Logger) error {
	tlsCfg, dev, err := serverTLS(cfg)
	if err != nil {
		return err
	}
	models, err := modelSpecs(cfg, log)
	if err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable for workers: %w", err)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	pool, err := backend.NewPool(backend.PoolConfig{
		Workers:    cfg.Workers.Count,
		Executable: exe,
		Worker: backend.WorkerConfig{
			Models:         models,
			ORTLib:         onnxRuntimeLib(cfg.ONNXRuntimeLib, exe),
			Slots:          cfg.Workers.Slots,
			IntraOpThreads: cfg.Workers.IntraOpThreads,
		},
		RingSize:    cfg.Workers.RingBytes,
		CallBuffer:  cfg.Workers.CallBuffer,
		HangTimeout: time.Duration(cfg.Workers.HangTimeout),
		Registerer:  reg,
	}, log)
	if err != nil {
		return err
	}
	sched, err := scheduler.New(scheduler.Config{
		MaxQueue:   cfg.Scheduler.MaxQueue,
		RetryAfter: time.Duration(cfg.Scheduler.RetryAfter),
	}, poolWorkers{pool}, log)
	if err != nil {
		return err
	}
	gw, err := gateway.New(gateway.Config{
		Listen:           cfg.Listen,
		Admin:            cfg.Admin,
		TLS:              tlsCfg,
		MaxBodyBytes:     cfg.Gateway.MaxBodyBytes,
		DefaultMaxTokens: cfg.Gateway.DefaultMaxTokens,
		Registry:         reg,
	}, gateway.FromScheduler(sched), poolCatalog{pool}, log)
	if err != nil {
		return err
	}

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
		printNextSteps(stdout, gw.Addr(), gw.AdminAddr(), dev)
	}
	<-ctx.Done()
	log.Info("shutting down", "grace", shutdownGrace)

	// Stop accepting and let streams finish, then stop what fed them.
	sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	err = gw.Shutdown(sctx)
	sched.Close()
	if cerr := pool.Close(); cerr != nil {
		err = errors.Join(err, cerr)
	}
	if readyErr != nil && !errors.Is(readyErr, context.Canceled) {
		err = errors.Join(err, readyErr)
	}
	return err
}

// serverTLS loads the configured certificate or makes sure the development
// CA and leaf exist under the state dir.
func serverTLS(cfg Config) (*tls.Config, *certs.Dev, error) {
	var (
		kp  tls.Certificate
		dev *certs.Dev
		err error
	)
	if cfg.TLS.CertFile != "" {
		kp, err = certs.LoadKeyPair(cfg.TLS.CertFile, cfg.TLS.KeyFile)
	} else {
		dev, err = certs.EnsureDev(filepath.Join(cfg.StateDir, "certs"), certs.DevOptions{})
		if err == nil {
			kp, err = certs.LoadKeyPair(dev.CertFile, dev.KeyFile)
		}
	}
	if err != nil {
		return nil, nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{kp}, MinVersion: tls.VersionTLS12}, dev, nil
}

// modelSpecs returns the configured models, or the demo model, written into
// the state dir the first time.
func modelSpecs(cfg Config, log *slog.Logger) ([]backend.ModelSpec, error) {
	var specs []backend.ModelSpec
	for _, m := range cfg.Models {
		specs = append(specs, backend.ModelSpec{Name: m.Name, Dir: m.Dir})
	}
	if len(specs) > 0 {
		return specs, nil
	}
	dir := filepath.Join(cfg.StateDir, "models", "demo", "1")
	if _, err := os.Stat(filepath.Join(dir, "model.onnx")); errors.Is(err, os.ErrNotExist) {
		if err := onnxgen.Write(dir, onnxgen.DefaultOptions()); err != nil {
			return nil, fmt.Errorf("write demo model: %w", err)
		}
		log.Info("wrote demo model", "dir", dir)
	} else if err != nil {
		return nil, fmt.Errorf("demo model: %w", err)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	return []backend.ModelSpec{{Name: "demo", Dir: abs}}, nil
}

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

func printNextSteps(w io.Writer, addr, adminAddr string, dev *certs.Dev) {
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
	caFlag := ""
	if dev != nil {
		fmt.Fprintf(&b, "  CA certificate:                        %s\n", dev.CAFile)
		fmt.Fprintf(&b, "  Leaf SPKI pin (for Chromium):          %s\n", dev.SPKI)
		caFlag = " --ca " + dev.CAFile
	}
	fmt.Fprintf(&b, "\nStream a completion over HTTP/3:\n")
	fmt.Fprintf(&b, "  %s chat --url %s%s \"The gateway\"\n", self, base, caFlag)
	if dev != nil {
		fmt.Fprintf(&b, "\nOver TCP with curl:\n")
		fmt.Fprintf(&b, "  curl --cacert %s %s/v1/models\n", dev.CAFile, base)
		fmt.Fprintf(&b, "\nChromium over HTTP/3 (see README):\n")
		fmt.Fprintf(&b, "  chromium --user-data-dir=$(mktemp -d) --enable-quic --origin-to-force-quic-on=%s --ignore-certificate-errors-spki-list=%s '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost' %s/v1/models\n",
			net.JoinHostPort(host, port), dev.SPKI, base)
	}
	fmt.Fprintln(&b)
	io.WriteString(w, b.String())
}

// poolWorkers adapts backend.Pool to the scheduler's WorkerSet.
type poolWorkers struct{ pool *backend.Pool }

func (p poolWorkers) Workers() []scheduler.Worker {
	ws := p.pool.Workers()
	out := make([]scheduler.Worker, len(ws))
	for i, w := range ws {
		out[i] = w
	}
	return out
}

// poolCatalog adapts backend.Pool to the gateway's Catalog.
type poolCatalog struct{ *backend.Pool }

func (p poolCatalog) WorkerStates() []gateway.WorkerState {
	st := p.Status()
	out := make([]gateway.WorkerState, len(st))
	for i, w := range st {
		out[i] = gateway.WorkerState{
			ID:                      w.ID,
			PID:                     w.PID,
			State:                   w.State,
			Slots:                   w.Slots,
			Restarts:                w.Restarts,
			LastExit:                w.LastExit,
			HeartbeatStalledSeconds: w.HeartbeatStalled.Seconds(),
		}
	}
	return out
}

var (
	_ scheduler.WorkerSet = poolWorkers{}
	_ scheduler.Worker    = (*backend.Worker)(nil)
	_ gateway.Catalog     = poolCatalog{}
)
