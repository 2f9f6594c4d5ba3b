package loadgen

import (
	"context"
	"crypto/tls"
	"os"
	"strings"
	"testing"
	"time"
)

func TestOverloadFigures(t *testing.T) {
	ms := func(n float64) time.Duration { return time.Duration(n * float64(time.Millisecond)) }
	overload := []Sample{
		{Start: 0, TTFT: ms(50), E2E: ms(900)},
		{Start: ms(500), TTFT: ms(60), E2E: ms(400)},
		{Start: ms(800), TTFT: ms(70), E2E: ms(400)}, // finishes after the window
		{Start: ms(100), E2E: ms(1), Err: "status_503", RetryAfter: 1},
		{Start: ms(200), E2E: ms(2), Err: "status_503", RetryAfter: 3},
		{Start: ms(300), E2E: ms(3), Err: "status_503", RetryAfter: 1},
		{Start: ms(400), Err: ErrNoDone},
	}
	o := &OverloadResult{
		Label:    "count",
		Capacity: newResult(Config{Concurrency: 64}, []Sample{{TTFT: ms(40), E2E: ms(100)}}, time.Second),
		Unloaded: newResult(Config{}, []Sample{{TTFT: ms(10), E2E: ms(20)}, {TTFT: ms(12), E2E: ms(20)}}, time.Second),
		Overload: newResult(Config{}, overload, ms(1200)),
		Probe:    newResult(Config{}, []Sample{{TTFT: ms(15), E2E: ms(30)}}, time.Second),
		Recovery: newResult(Config{}, []Sample{
			{Start: 0, TTFT: ms(900), E2E: ms(950)},
			{Start: ms(950), TTFT: ms(14), E2E: ms(30)}, // the first back (limit 15ms)
			{Start: ms(1000), TTFT: ms(40), E2E: ms(60)},
			{Start: ms(2100), TTFT: ms(11), E2E: ms(20)},
			{Start: ms(2200), TTFT: ms(30), E2E: ms(50)}, // late after 2s
		}, 3*time.Second),
		CapacityRPS: 100,
		RSS:         []RSSRow{{0, 100 << 20}, {ms(100), 130 << 20}, {ms(200), 110 << 20}},
	}
	if got := finishedWithin(o.Overload, time.Second); got != 2 {
		t.Errorf("goodput: got %v, want 2 requests/s (two finished within the second)", got)
	}
	o.GoodputRPS = 95
	o.recovery(ms(10))
	if !o.Recovered || o.RecoveryTime != ms(960) || o.Settled || o.Late != 1 || o.Checked != 2 {
		t.Errorf("recovery: got recovered %v after %s, settled %v, %d of %d late; want true, 960ms, false, 1 of 2",
			o.Recovered, o.RecoveryTime, o.Settled, o.Late, o.Checked)
	}
	if o.RSSStart() != 100<<20 || o.RSSPeak() != 130<<20 {
		t.Errorf("rss: got start %d peak %d", o.RSSStart(), o.RSSPeak())
	}
	var b strings.Builder
	if err := WriteOverloadTable(&b, []*OverloadResult{o, o}); err != nil {
		t.Fatal(err)
	}
	table := strings.Join(strings.Fields(b.String()), " ") // columns as single spaces
	for _, want := range []string{
		"goodput / capacity >= 0.95 0.95 0.95",
		"refusals in overload 3 of 7",
		"retry-after min / median / max 1s / 1s / 3s",
		"rss peak / start <= 1.2 1.30",
		"u0 ttft p99 / unloaded <= 1.5 1.25",
		"recovery time <= 2s 960ms",
		"no (1 of 2 after 2s late)",
		"broken streams 0 1 1 error events 0 0 0",
	} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
}

// TestRunOverloadAgainstBareServer runs every phase, briefly, against the
// real bare server (which never refuses), reading this process's memory.
func TestRunOverloadAgainstBareServer(t *testing.T) {
	srv, pool := startBare(t)
	res, err := RunOverload(context.Background(), OverloadConfig{
		Base: Config{URL: "https://" + srv, TLS: &tls.Config{RootCAs: pool}, OutputTokens: Dist{Kind: DistFixed, A: 7}, Timeout: 10 * time.Second},
		PID:  os.Getpid(), CapacityConcurrency: 4, CapacityDuration: 300 * time.Millisecond,
		// The open loop's fixed seed puts the first probe at 1.53 s; the
		// overload runs well past it, since a loaded machine fires the
		// arrival timer late (CI once missed a 1.6 s window).
		Unloaded: 1, Factor: 2, Duration: 2200 * time.Millisecond, Recovery: 300 * time.Millisecond,
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.CapacityRPS <= 0 || res.OverloadRate != 2*res.CapacityRPS || res.Unloaded.OK != 1 || res.Overload.OK == 0 || res.Probe.Requests == 0 || res.Recovery.OK == 0 {
		t.Errorf("got capacity %.1f/s, overload at %.1f/s with %d ok, %d unloaded ok, %d probes, %d recovery ok",
			res.CapacityRPS, res.OverloadRate, res.Overload.OK, res.Unloaded.OK, res.Probe.Requests, res.Recovery.OK)
	}
	if len(res.RSS) < 10 || res.RSSStart() <= 0 || res.RSSPeak() < res.RSSStart() {
		t.Errorf("got %d memory readings, start %d, peak %d; want one every 100ms over the run", len(res.RSS), res.RSSStart(), res.RSSPeak())
	}
	// The load generator shares the CPU with the server here, so the
	// open loop may find its in-flight bound full (dropped); nothing else
	// may fail.
	errs := res.errorKinds()
	delete(errs, ErrDropped)
	if len(errs) != 0 {
		t.Errorf("errors against the bare server: %v", errs)
	}
}
