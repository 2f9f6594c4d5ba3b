package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// benchJSON is the part of `bench --json` the tests check.
type benchJSON struct {
	Runs []struct {
		Label       string         `json:"label"`
		Proto       string         `json:"proto"`
		Concurrency int            `json:"concurrency"`
		Requests    int            `json:"requests"`
		OK          int            `json:"ok"`
		Early       int            `json:"early"`
		Retried     int            `json:"retried"`
		Errors      map[string]int `json:"errors"`
		Tokens      int            `json:"tokens"`
		TTFT        struct {
			Count int `json:"count"`
		} `json:"ttft"`
	} `json:"runs"`
}

func runBenchCmd(t *testing.T, args ...string) (string, benchJSON) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "bench.json")
	cmd := exec.Command(buildBinary(t), append([]string{"bench", "--json", out}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("h3infer bench %v: %v\n%s\n%s", args, err, stdout.String(), stderr.String())
	}
	// Not a terminal: no progress bar may litter a log.
	if strings.Contains(stderr.String(), "\r") {
		t.Errorf("bench drew a progress bar on a pipe: %q", stderr.String())
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var res benchJSON
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatalf("bench JSON: %v\n%s", err, b)
	}
	return stdout.String(), res
}

// TestBenchDemoModel loads a real gateway serving the real demo model over
// each protocol and checks every request streamed its tokens. ignore_eos
// makes each request generate exactly its 8 tokens: without it the demo
// model may draw its end token first and answer with no content at all.
func TestBenchDemoModel(t *testing.T) {
	s := startServer(t)
	for _, proto := range []string{"h3", "h2", "h1"} {
		table, res := runBenchCmd(t, "--url", s.base, "--ca", s.caFile, "--state-dir", s.stateDir, "--proto", proto,
			"--concurrency", "2", "--requests", "6", "--output-tokens", "8", "--ignore-eos", "--urgency", "0:1,5:1")
		if len(res.Runs) != 1 {
			t.Fatalf("%s: got %d runs, want 1", proto, len(res.Runs))
		}
		r := res.Runs[0]
		if r.Proto != proto || r.Requests != 6 || r.OK != 6 || len(r.Errors) != 0 {
			t.Errorf("%s: got proto %s, %d requests, %d ok, errors %v; want 6 ok and no errors\n%s", proto, r.Proto, r.Requests, r.OK, r.Errors, table)
		}
		if r.Tokens != 6*8 || r.TTFT.Count != 6 {
			t.Errorf("%s: got %d tokens and %d TTFT samples, want 48 and 6", proto, r.Tokens, r.TTFT.Count)
		}
		for _, want := range []string{"6 requests, 6 ok, 0 errors", "ttft", "inter-token", "e2e", "tokens/s", "errors: none"} {
			if !strings.Contains(table, want) {
				t.Errorf("%s: table lacks %q:\n%s", proto, want, table)
			}
		}
	}
}

// startBare runs `h3infer bench --bare-listen` on a free port with the
// certificates of stateDir and stops it when the test ends.
func startBare(t *testing.T, stateDir string) string {
	t.Helper()
	cmd := exec.Command(buildBinary(t), "bench", "--bare-listen", "127.0.0.1:0", "--state-dir", stateDir)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "bare server listening on "); ok {
				addr <- a
			}
		}
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("bare server exited with %v after SIGTERM\n%s", err, stderr.String())
			}
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-exited
			t.Errorf("bare server did not exit within 20s of SIGTERM")
		}
	})
	select {
	case a := <-addr:
		return "https://" + a
	case <-time.After(30 * time.Second):
		t.Fatalf("bare server did not start\n%s", stderr.String())
	}
	return ""
}

// TestBenchSyntheticAgainstBare runs the overhead comparison end to end:
// a gateway whose workers serve the synthetic model, the bare server, both
// loaded in one bench run with ratios, JSON and plots.
func TestBenchSyntheticAgainstBare(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "synthetic.json")
	if err := os.WriteFile(cfg, []byte(`{"workers": {"slots": 16}, "models": [{"name": "demo", "dir": "synthetic"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, "--config", cfg)
	bare := startBare(t, s.stateDir)
	plots := filepath.Join(t.TempDir(), "plot")
	table, res := runBenchCmd(t, "--url", s.base, "--baseline-url", bare, "--ca", s.caFile, "--state-dir", s.stateDir,
		"--concurrency", "1,8", "--requests", "24", "--output-tokens", "5-20", "--plot", plots)
	if len(res.Runs) != 4 {
		t.Fatalf("got %d runs, want 4 (two levels, two servers)\n%s", len(res.Runs), table)
	}
	for i, r := range res.Runs {
		wantLabel := []string{"h3infer", "bare"}[i%2]
		if r.Label != wantLabel || r.Concurrency != []int{1, 8}[i/2] {
			t.Errorf("run %d: got %s at concurrency %d", i, r.Label, r.Concurrency)
		}
		if r.OK != 24 || len(r.Errors) != 0 || r.Tokens < 24*5 || r.Tokens > 24*20 {
			t.Errorf("run %d (%s c=%d): %d ok, errors %v, %d tokens; want 24 ok, no errors, 120..480 tokens", i, r.Label, r.Concurrency, r.OK, r.Errors, r.Tokens)
		}
	}
	if n := strings.Count(table, "ratio h3infer/bare at concurrency"); n != 2 {
		t.Errorf("table has %d ratio lines, want 2:\n%s", n, table)
	}
	for _, name := range []string{plots + "-cdf.png", plots + "-ttft.png"} {
		f, err := os.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		img, err := png.Decode(f)
		f.Close()
		if err != nil || img.Bounds().Dx() < 100 {
			t.Errorf("%s: not a usable PNG: %v", name, err)
		}
	}
}

// TestBenchZeroRTT checks that `bench --new-conn --0rtt` over h3 really
// sends each completion in 0-RTT through package client, and says so,
// while the same run without --0rtt sends none early.
func TestBenchZeroRTT(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "synthetic.json")
	// A short freshness window: after start-up the in-memory strike
	// register declines 0-RTT for two windows.
	if err := os.WriteFile(cfg, []byte(`{"zero_rtt": {"window": "300ms"}, "models": [{"name": "demo", "dir": "synthetic"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, "--config", cfg)
	time.Sleep(800 * time.Millisecond)
	common := []string{"--url", s.base, "--ca", s.caFile, "--state-dir", s.stateDir, "--new-conn", "--requests", "6", "--output-tokens", "4"}
	table, res := runBenchCmd(t, append(common, "--0rtt")...)
	if len(res.Runs) != 1 {
		t.Fatalf("got %d runs, want 1", len(res.Runs))
	}
	// Every request goes out in 0-RTT, but on loopback the client's
	// Finished can reach the gateway before the request's handler looks,
	// and then the gateway serves it as 1-RTT; over the emulated link of
	// scripts/bench-netem.sh all of them are early. So: some, not all.
	r := res.Runs[0]
	if r.OK != 6 || r.Early < 1 || r.Retried != 0 {
		t.Errorf("0-RTT run: %d ok, %d early, %d retried; want 6 ok, some early, none retried\n%s", r.OK, r.Early, r.Retried, table)
	}
	if want := fmt.Sprintf("0-RTT: %d of 6 ok requests served early", r.Early); !strings.Contains(table, want) {
		t.Errorf("table does not say %q:\n%s", want, table)
	}
	table, res = runBenchCmd(t, common...)
	if r := res.Runs[0]; r.OK != 6 || r.Early != 0 {
		t.Errorf("1-RTT run: %d ok, %d early; want 6 ok, none early\n%s", r.OK, r.Early, table)
	}
}

// TestBenchMemory runs a small memory run against a real gateway: every
// connection completes its handshake and stays open, every stream runs
// while the gateway's memory is read, and the figures are that process's
// resident set.
func TestBenchMemory(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "synthetic.json")
	// A token per 100ms: 100 tokens outlast the reading by far.
	if err := os.WriteFile(cfg, []byte(`{"workers": {"slots": 8}, "models": [{"name": "demo", "dir": "synthetic:100ms"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, "--config", cfg)
	out := filepath.Join(t.TempDir(), "memory.json")
	cmd := exec.Command(buildBinary(t), "bench", "--url", s.base, "--ca", s.caFile, "--state-dir", s.stateDir,
		"--mem-pid", fmt.Sprint(s.cmd.Process.Pid), "--mem-conns", "3,12", "--mem-streams", "6",
		"--mem-stream-tokens", "100", "--mem-settle", "100ms", "--json", out)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("bench --mem-pid: %v\n%s\n%s", err, stdout.String(), stderr.String())
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var res struct {
		PID      int   `json:"pid"`
		Baseline int64 `json:"baseline_rss_bytes"`
		Steps    []struct {
			Conns, Alive, Streams int
			RSS                   int64 `json:"rss_bytes"`
		} `json:"steps"`
	}
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatalf("memory JSON: %v\n%s", err, b)
	}
	if res.PID != s.cmd.Process.Pid || res.Baseline < 1<<20 || len(res.Steps) != 3 {
		t.Fatalf("got pid %d, baseline %d bytes, %d steps; want pid %d, a baseline over 1 MiB, 3 steps\n%s", res.PID, res.Baseline, len(res.Steps), s.cmd.Process.Pid, b)
	}
	for i, want := range []struct{ conns, streams int }{{3, 0}, {12, 0}, {12, 6}} {
		st := res.Steps[i]
		if st.Conns != want.conns || st.Alive != want.conns || st.Streams != want.streams || st.RSS < 1<<20 {
			t.Errorf("step %d: %d conns (%d open), %d streams, rss %d; want %d open conns, %d streams, rss over 1 MiB", i, st.Conns, st.Alive, st.Streams, st.RSS, want.conns, want.streams)
		}
	}
	// The streams really ran on the workers, and were still running when
	// the run ended them.
	waitForMetric(t, s, "h3infer_worker_sequences_cancelled_total", 6)
	for _, want := range []string{"baseline", "12 idle h3 connections (12 open)", "6 active streams on 12 conns", "per stream"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, stdout.String())
		}
	}
}

// TestBenchOverload runs the overload scenario, briefly, against a real
// gateway whose queue holds four requests (so that it refuses) and, as the
// baseline, the bare server, and checks both columns and the refusals.
func TestBenchOverload(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "synthetic.json")
	if err := os.WriteFile(cfg, []byte(`{"workers": {"count": 1, "slots": 2}, "scheduler": {"max_queue": 4},
		"models": [{"name": "demo", "dir": "synthetic:5ms"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, "--config", cfg)
	bare := startBare(t, s.stateDir)
	out := filepath.Join(t.TempDir(), "overload.json")
	cmd := exec.Command(buildBinary(t), "bench", "--overload", "--json", out, "--url", s.base, "--label", "gw",
		"--baseline-url", bare, "--ca", s.caFile, "--state-dir", s.stateDir,
		"--overload-pid", fmt.Sprint(s.cmd.Process.Pid), "--output-tokens", "8",
		"--overload-capacity-concurrency", "8", "--overload-capacity-duration", "500ms", "--overload-unloaded", "1",
		"--overload-duration", "1600ms", "--overload-recovery", "500ms")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("bench --overload: %v\n%s\n%s", err, stdout.String(), stderr.String())
	}
	var res struct {
		Runs []struct {
			Label    string          `json:"label"`
			Capacity float64         `json:"capacity_rps"`
			RSS      []struct{}      `json:"rss"`
			Overload benchRefusalRun `json:"overload"`
		} `json:"overload_runs"`
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatalf("overload JSON: %v\n%s", err, b)
	}
	if len(res.Runs) != 2 || res.Runs[0].Label != "gw" || res.Runs[1].Label != "bare" {
		t.Fatalf("got %d runs, want gw then bare\n%s", len(res.Runs), stdout.String())
	}
	gw := res.Runs[0]
	if gw.Capacity <= 0 || len(gw.RSS) < 10 || gw.Overload.Refused.Count == 0 || gw.Overload.Refused.Count != gw.Overload.Errors["status_503"] || len(gw.Overload.RetryAfter) == 0 {
		t.Errorf("gateway: capacity %.1f/s, %d memory readings, %d refused of errors %v, retry-after %v; want refusals timed, counted and their Retry-After kept\n%s",
			gw.Capacity, len(gw.RSS), gw.Overload.Refused.Count, gw.Overload.Errors, gw.Overload.RetryAfter, stdout.String())
	}
	table := strings.Join(strings.Fields(stdout.String()), " ")
	for _, want := range []string{"== overload scenario", "figure goal gw bare", "goodput / capacity >= 0.95", "refusal latency p50 / p99"} {
		if !strings.Contains(table, want) {
			t.Errorf("output lacks %q:\n%s", want, stdout.String())
		}
	}
}

// benchRefusalRun is the part of a JSON run the overload test checks.
type benchRefusalRun struct {
	Errors  map[string]int `json:"errors"`
	Refused struct {
		Count int `json:"count"`
	} `json:"refused"`
	RetryAfter map[string]int `json:"retry_after_s"`
}
