package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"h3infer/certs"
	"h3infer/internal/loadgen"
	"h3infer/internal/loadgen/bareserver"
	"h3infer/internal/qlogdir"
	"h3infer/tlsbind"
)

// runBench is `h3infer bench`: load against a gateway (and, with
// --baseline-url, the same load against a comparison server in the same
// run), or with --bare-listen the comparison server itself.
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	url := fs.String("url", "https://127.0.0.1:8443", "endpoint to load")
	baseline := fs.String("baseline-url", "", "a comparison endpoint (h3infer bench --bare-listen, or the upstream an edge gateway forwards to) loaded the same way after each level; the table then shows ratios")
	baselineLabel := fs.String("baseline-label", "bare", "name of --baseline-url in tables, JSON and plots")
	baselineState := fs.String("baseline-state-dir", "", "state directory of a gateway at --baseline-url (an upstream tier): its dev CA and dev token are used for it (default: --ca and no token, as the bare server wants)")
	label := fs.String("label", "h3infer", "name of --url in tables, JSON and plots")
	proto := fs.String("proto", "h3", "h3, h2 or h1")
	caFile := fs.String("ca", ".h3infer/certs/ca.pem", "CA certificate that signed the server's certificate")
	model := fs.String("model", loadgen.DefaultModel, "model name")
	levels := fs.String("concurrency", "1", "requests in flight; a comma-separated list runs each level in turn")
	rate := fs.Float64("rate", 0, "open loop: mean requests per second with Poisson arrivals (0: closed loop)")
	requests := fs.Int("requests", 0, "requests per level (0: bounded by --duration only)")
	duration := fs.Duration("duration", 0, "time per level (0: bounded by --requests only)")
	prompt := fs.String("prompt-words", "32", "prompt length in words: N, MIN-MAX or exp:MEAN")
	output := fs.String("output-tokens", "64", "max_tokens per request: N, MIN-MAX or exp:MEAN")
	urgency := fs.String("urgency", "", "urgency mix sent as the Priority header, such as 0:1,3:8,7:1 (default: no header)")
	ignoreEOS := fs.Bool("ignore-eos", false, "send ignore_eos: the server generates each request's max_tokens even past the model's end token")
	newConn := fs.Bool("new-conn", false, "open a new connection for every request (handshake included in TTFT)")
	zeroRTT := fs.Bool("0rtt", false, "with --new-conn: resume TLS sessions; over h3 with a credential that has its secret, send each completion in 0-RTT with an early proof")
	timeout := fs.Duration("timeout", loadgen.DefaultTimeout, "bound on one request")
	jsonOut := fs.String("json", "", "write every run as JSON to this file")
	plotOut := fs.String("plot", "", "write PNG plots as PREFIX-cdf.png (latency CDFs) and PREFIX-ttft.png (TTFT against concurrency)")
	qlog := fs.String("qlog", "", "write a qlog trace of every h3 connection the run opens into this directory, header values redacted")
	progress := fs.Bool("progress", true, "draw a progress bar when stderr is a terminal")
	bareListen := fs.String("bare-listen", "", "serve the comparison server on host:port instead of loading anything")
	bareInterval := fs.Duration("bare-interval", 0, "comparison server: time between tokens of one stream (0: as fast as possible)")
	bareZeroRTT := fs.Bool("bare-0rtt", true, "comparison server: accept 0-RTT early data")
	stateDir := fs.String("state-dir", ".h3infer", "directory holding the development certificates (comparison server) and the dev token")
	token := fs.String("token", "", "credential or bearer token (default: $H3INFER_TOKEN, else STATE_DIR/tokens/dev.token when present)")
	memPID := fs.Int("mem-pid", 0, "memory run instead of load: read this server process's resident memory (/proc/PID/status) before and while holding --mem-conns idle h3 connections and --mem-streams streams")
	memConns := fs.String("mem-conns", "1000,10000", "memory run: ascending counts of idle h3 connections to hold, all over one UDP socket")
	memStreams := fs.Int("mem-streams", 1000, "memory run: streamed completions held open over the last level's connections (0: none)")
	memTokens := fs.Int("mem-stream-tokens", loadgen.DefaultStreamTokens, "memory run: max_tokens of each stream; at the server's pace it must outlast the reading")
	memSettle := fs.Duration("mem-settle", 2*time.Second, "memory run: wait before the memory is read at each step")
	memParallel := fs.Int("mem-parallel", 32, "memory run: handshakes and stream starts in flight at once")
	memStepTimeout := fs.Duration("mem-step-timeout", 5*time.Minute, "memory run: bound on opening one level's connections, or the streams")
	overload := fs.Bool("overload", false, "overload scenario instead of a load: capacity in closed loop, unloaded urgency-0 TTFT, an open loop at --overload-factor times the capacity with urgency-0 probes beside it, then recovery; for --url and then --baseline-url")
	overPID := fs.Int("overload-pid", 0, "overload scenario: the process serving --url, whose resident memory (/proc/PID/status) is read every 100 ms (0: none)")
	overBasePID := fs.Int("overload-baseline-pid", 0, "overload scenario: the process serving --baseline-url (0: none)")
	overFactor := fs.Float64("overload-factor", loadgen.DefaultOverloadFactor, "overload scenario: the open loop's rate over the measured capacity")
	overDuration := fs.Duration("overload-duration", loadgen.DefaultOverloadDuration, "overload scenario: how long the open loop and its probes send")
	overCapConc := fs.Int("overload-capacity-concurrency", loadgen.DefaultCapacityConcurrency, "overload scenario: the closed loop that measures capacity")
	overCapDuration := fs.Duration("overload-capacity-duration", loadgen.DefaultCapacityDuration, "overload scenario: how long the closed loop runs")
	overUnloaded := fs.Int("overload-unloaded", loadgen.DefaultUnloaded, "overload scenario: urgency-0 requests, one a second, before the overload")
	overRecovery := fs.Duration("overload-recovery", loadgen.DefaultRecovery, "overload scenario: how long one request at a time runs after the overload")
	cpuPID := fs.Int("cpu-pid", 0, "the process serving --url: its CPU time and its child processes' (a gateway's workers), from /proc, is read around each level and shown per token (0: not measured)")
	baseCPUPID := fs.Int("baseline-cpu-pid", 0, "the process serving --baseline-url, measured as --cpu-pid is")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *bareListen != "" {
		return serveBare(ctx, *bareListen, *stateDir, *bareInterval, *bareZeroRTT, stdout, log)
	}
	if *memPID != 0 {
		mc := loadgen.MemoryConfig{
			URL: *url, Model: *model, PID: *memPID, Streams: *memStreams, StreamTokens: *memTokens,
			Parallel: *memParallel, Settle: *memSettle, StepTimeout: *memStepTimeout,
		}
		for f := range strings.SplitSeq(*memConns, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				return usageError{fmt.Errorf("mem-conns: want a list of numbers, got %q", *memConns)}
			}
			mc.Conns = append(mc.Conns, n)
		}
		if err := mc.Validate(); err != nil {
			return usageError{err}
		}
		return runMemory(ctx, mc, *caFile, *token, *stateDir, *jsonOut, stdout)
	}

	var errs []error
	cfg := loadgen.Config{
		URL: *url, Proto: *proto, Model: *model, Rate: *rate, Requests: *requests,
		Duration: *duration, NewConnection: *newConn, ZeroRTT: *zeroRTT, IgnoreEOS: *ignoreEOS, Timeout: *timeout,
	}
	var err error
	if cfg.PromptWords, err = loadgen.ParseDist(*prompt); err != nil {
		errs = append(errs, fmt.Errorf("prompt-words: %w", err))
	}
	if cfg.OutputTokens, err = loadgen.ParseDist(*output); err != nil {
		errs = append(errs, fmt.Errorf("output-tokens: %w", err))
	}
	if *urgency != "" {
		if cfg.Urgency, err = loadgen.ParseUrgencyMix(*urgency); err != nil {
			errs = append(errs, fmt.Errorf("urgency: %w", err))
		}
	}
	var conc []int
	for f := range strings.SplitSeq(*levels, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			errs = append(errs, fmt.Errorf("concurrency: want a list of numbers >= 1, got %q", *levels))
			break
		}
		conc = append(conc, n)
	}
	if len(conc) > 0 && !*overload { // the scenario bounds its own phases
		cfg.Concurrency = conc[0]
		if err := cfg.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return usageError{err}
	}
	if *qlog != "" {
		if cfg.QUICTracer, err = qlogdir.New(*qlog, log); err != nil {
			return err
		}
	}
	pool, err := certs.LoadPool(*caFile)
	if err != nil {
		return err
	}
	cfg.TLS = &tls.Config{RootCAs: pool}
	if cfg.Bearer, cfg.Credential, err = benchCredential(*token, *stateDir); err != nil {
		return err
	}
	// The baseline is loaded with its own trust and token: an upstream
	// tier has its own CA and issues its own tokens.
	baseCfg := cfg
	baseCfg.Bearer, baseCfg.Credential = "", ""
	if *baselineState != "" {
		bpool, err := certs.LoadPool(filepath.Join(*baselineState, "certs", certs.CAFile))
		if err != nil {
			return fmt.Errorf("baseline-state-dir: %w", err)
		}
		baseCfg.TLS = &tls.Config{RootCAs: bpool}
		cred, err := os.ReadFile(devTokenFile(*baselineState))
		if err != nil {
			return fmt.Errorf("baseline-state-dir: %w", err)
		}
		if baseCfg.Bearer, baseCfg.Credential, err = benchCredential(strings.TrimSpace(string(cred)), *stateDir); err != nil {
			return fmt.Errorf("baseline-state-dir: %w", err)
		}
	}

	if *overload {
		type target struct {
			name string
			cfg  loadgen.Config
			pid  int
		}
		targets := []target{{*label, cfg, *overPID}}
		if *baseline != "" {
			baseCfg.URL = *baseline
			targets = append(targets, target{*baselineLabel, baseCfg, *overBasePID})
		}
		var ocs []loadgen.OverloadConfig
		for _, t := range targets {
			oc := loadgen.OverloadConfig{
				Base: t.cfg, PID: t.pid, CapacityConcurrency: *overCapConc, CapacityDuration: *overCapDuration,
				Unloaded: *overUnloaded, Factor: *overFactor, Duration: *overDuration, Recovery: *overRecovery,
			}
			if err := oc.Validate(); err != nil {
				return usageError{err}
			}
			ocs = append(ocs, oc)
		}
		var runs []*loadgen.OverloadResult
		for i, oc := range ocs {
			name := targets[i].name
			res, err := loadgen.RunOverload(ctx, oc, func(phase string) { fmt.Fprintf(stderr, "%s: %s\n", name, phase) })
			if err != nil {
				return fmt.Errorf("overload %s: %w", name, err)
			}
			res.Label = name
			runs = append(runs, res)
			for _, p := range []struct {
				what string
				r    *loadgen.Result
			}{{"capacity", res.Capacity}, {"unloaded u0", res.Unloaded}, {"overload", res.Overload}, {"u0 probes during overload", res.Probe}, {"recovery", res.Recovery}} {
				fmt.Fprintf(stdout, "== %s: %s\n", name, p.what)
				p.r.Label = name
				if err := p.r.WriteTable(stdout); err != nil {
					return err
				}
			}
			fmt.Fprintln(stdout)
		}
		fmt.Fprintln(stdout, "== overload scenario")
		if err := loadgen.WriteOverloadTable(stdout, runs); err != nil {
			return err
		}
		if *jsonOut != "" {
			return writeFile(*jsonOut, func(w io.Writer) error {
				enc := json.NewEncoder(w)
				enc.SetIndent("", "  ")
				return enc.Encode(struct {
					Runs []*loadgen.OverloadResult `json:"overload_runs"`
				}{runs})
			})
		}
		return nil
	}

	showBar := *progress && isTerminal(stderr)
	var results []*loadgen.Result
	for _, c := range conc {
		type target struct {
			name, url string
			cfg       loadgen.Config
			cpuPID    int
		}
		targets := []target{{*label, *url, cfg, *cpuPID}}
		if *baseline != "" {
			targets = append(targets, target{*baselineLabel, *baseline, baseCfg, *baseCPUPID})
		}
		var pair []*loadgen.Result
		for _, t := range targets {
			run := t.cfg
			run.Concurrency, run.URL = c, t.url
			var onProgress func(loadgen.Progress)
			if showBar {
				onProgress = progressBar(stderr, fmt.Sprintf("%s c=%d", t.name, c))
			}
			cpuBefore, cpuErr := processCPU(t.cpuPID)
			res, err := loadgen.Run(ctx, run, onProgress)
			if err != nil {
				return err
			}
			res.Label = t.name
			if cpuAfter, err := processCPU(t.cpuPID); err == nil && cpuErr == nil && t.cpuPID != 0 {
				res.ServerCPU = cpuAfter - cpuBefore
				if res.Tokens > 0 {
					res.CPUPerToken = res.ServerCPU / time.Duration(res.Tokens)
				}
			}
			results = append(results, res)
			pair = append(pair, res)
			if err := res.WriteTable(stdout); err != nil {
				return err
			}
			fmt.Fprintln(stdout)
			if ctx.Err() != nil {
				return ctx.Err()
			}
		}
		if len(pair) == 2 {
			writeRatios(stdout, pair[0], pair[1])
		}
	}
	if *jsonOut != "" {
		if err := writeFile(*jsonOut, func(w io.Writer) error { return loadgen.WriteJSON(w, results) }); err != nil {
			return err
		}
	}
	if *plotOut != "" {
		if err := writeFile(*plotOut+"-cdf.png", func(w io.Writer) error { return loadgen.PlotCDF(w, results) }); err != nil {
			return err
		}
		if err := writeFile(*plotOut+"-ttft.png", func(w io.Writer) error { return loadgen.PlotTTFT(w, results) }); err != nil {
			return err
		}
	}
	return nil
}

// runMemory is `h3infer bench --mem-pid`: the server's memory with idle
// connections and running streams, bytes per connection and per stream
// against the baseline read at the start of the same run.
func runMemory(ctx context.Context, mc loadgen.MemoryConfig, caFile, token, stateDir, jsonOut string, stdout io.Writer) error {
	pool, err := certs.LoadPool(caFile)
	if err != nil {
		return err
	}
	mc.TLS = &tls.Config{RootCAs: pool}
	if mc.Bearer, _, err = benchCredential(token, stateDir); err != nil {
		return err
	}
	res, err := loadgen.RunMemory(ctx, mc)
	if err != nil {
		if res != nil {
			res.WriteTable(stdout) // the steps done before it failed
		}
		return err
	}
	if err := res.WriteTable(stdout); err != nil {
		return err
	}
	if jsonOut != "" {
		return writeFile(jsonOut, func(w io.Writer) error {
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			return enc.Encode(res)
		})
	}
	return nil
}

// writeRatios prints the gateway's figures over the baseline's.
func writeRatios(w io.Writer, gw, bare *loadgen.Result) {
	ratio := func(a, b float64) string {
		if b == 0 {
			return "-"
		}
		return fmt.Sprintf("%.2f", a/b)
	}
	fmt.Fprintf(w, "ratio %s/%s at concurrency %d: ttft p50 %s, ttft p99 %s, inter-token p50 %s, tokens/s %s\n",
		gw.Label, bare.Label, gw.Concurrency,
		ratio(float64(gw.TTFT.P50), float64(bare.TTFT.P50)),
		ratio(float64(gw.TTFT.P99), float64(bare.TTFT.P99)),
		ratio(float64(gw.ITL.P50), float64(bare.ITL.P50)),
		ratio(gw.TokensPerS, bare.TokensPerS))
	fmt.Fprintf(w, "difference %s-%s at concurrency %d: ttft p50 %+.3f ms, ttft p99 %+.3f ms\n",
		gw.Label, bare.Label, gw.Concurrency,
		float64(gw.TTFT.P50-bare.TTFT.P50)/1e6, float64(gw.TTFT.P99-bare.TTFT.P99)/1e6)
	if gw.CPUPerToken > 0 && bare.CPUPerToken > 0 {
		fmt.Fprintf(w, "server cpu per token %s/%s at concurrency %d: %.1f µs / %.1f µs, ratio %s\n",
			gw.Label, bare.Label, gw.Concurrency,
			float64(gw.CPUPerToken)/1e3, float64(bare.CPUPerToken)/1e3,
			ratio(float64(gw.CPUPerToken), float64(bare.CPUPerToken)))
	}
	fmt.Fprintln(w)
}

// processCPU is loadgen.ProcessCPU, and nothing for pid 0.
func processCPU(pid int) (time.Duration, error) {
	if pid == 0 {
		return 0, nil
	}
	return loadgen.ProcessCPU(pid)
}

func writeFile(path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := write(f); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}

// serveBare runs the comparison server until ctx ends.
func serveBare(ctx context.Context, listen, stateDir string, interval time.Duration, zeroRTT bool, stdout io.Writer, log *slog.Logger) error {
	dev, err := certs.EnsureDev(filepath.Join(stateDir, "certs"), certs.DevOptions{})
	if err != nil {
		return err
	}
	kp, err := certs.LoadKeyPair(dev.CertFile, dev.KeyFile)
	if err != nil {
		return err
	}
	srv, err := bareserver.Start(bareserver.Config{
		Listen:   listen,
		TLS:      &tls.Config{Certificates: []tls.Certificate{kp}, MinVersion: tls.VersionTLS13},
		Interval: interval,
		ZeroRTT:  zeroRTT,
	}, log)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "bare server listening on %s\n", srv.Addr())
	<-ctx.Done()
	return srv.Close()
}

// isTerminal reports whether w is a terminal, where a progress bar helps
// rather than litters a log.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// progressBar redraws one line on w; the final call ends the line.
func progressBar(w io.Writer, name string) func(loadgen.Progress) {
	return func(p loadgen.Progress) {
		const width = 30
		filled := int(p.Fraction * width)
		bar := strings.Repeat("#", filled) + strings.Repeat(".", width-filled)
		fmt.Fprintf(w, "\r%-16s [%s] %3.0f%% %d done, %d errors, %d in flight, %s ",
			name, bar, p.Fraction*100, p.Done, p.Errors, p.InFlight, p.Elapsed.Round(100*time.Millisecond))
		if p.Final {
			fmt.Fprint(w, "\r\033[K")
		}
	}
}

// benchCredential picks the credential a bench run presents, as chat picks
// its own: the bearer token, and the full credential when it carries the
// secret that 0-RTT proofs need. A server without auth needs none, so a
// missing dev token is no error.
func benchCredential(flagValue, stateDir string) (bearer, credential string, err error) {
	cred, err := chatCredential(flagValue, stateDir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", "", nil
		}
		return "", "", err
	}
	if strings.Count(cred, ".") == 3 {
		return cred, "", nil // a bearer token alone
	}
	bearer, _, err = tlsbind.SplitCredential(cred)
	if err != nil {
		return "", "", fmt.Errorf("--token: %w", err)
	}
	return bearer, cred, nil
}
