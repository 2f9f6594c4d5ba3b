package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"strconv"
	"strings"
	"time"

	"h3infer/internal/netemu"
)

// runNetemu is `h3infer netemu`, left out of the usage text: benchmark
// tooling, like `bench --bare-listen`, kept in the one binary so that
// scripts/bench-netem.sh needs nothing else built. It joins two existing
// TUN devices, each in a network namespace of the script's, through the
// userspace link emulator until interrupted, then prints what each
// direction did.
func runNetemu(ctx context.Context, args []string, stdout io.Writer, log *slog.Logger) error {
	fs := flag.NewFlagSet("netemu", flag.ContinueOnError)
	nsA := fs.String("a-netns", "", "network namespace of side A, as a path (/run/netns/NAME); empty: this one")
	devA := fs.String("a-dev", "", "TUN device of side A (must exist)")
	nsB := fs.String("b-netns", "", "network namespace of side B, as a path")
	devB := fs.String("b-dev", "", "TUN device of side B (must exist)")
	delay := fs.Duration("delay", 0, "one-way delay, each direction")
	jitter := fs.Duration("jitter", 0, "uniform jitter ± this around the delay (packets may reorder)")
	loss := fs.String("loss", "0%", "random loss per packet, each direction, as a percentage such as 1%")
	burst := fs.Float64("burst", 0, "mean length of a run of lost packets (two-state loss); 0 or 1: independent losses")
	rate := fs.String("rate", "", "bandwidth each direction, such as 10mbit, 500kbit, 1gbit or 2000000 (bits per second); empty or 0: unlimited")
	rateQueue := fs.Int("rate-queue", netemu.DefaultRateQueue, "packets waiting for a rate-limited link before tail drop")
	limit := fs.Int("limit", netemu.DefaultLimit, "packets held per direction before tail drop")
	seed := fs.Uint64("seed", 1, "seed of the loss and jitter draws (direction B to A uses seed+1)")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *devA == "" || *devB == "" {
		return usagef("a-dev and b-dev are required")
	}
	pct, err := strconv.ParseFloat(strings.TrimSuffix(*loss, "%"), 64)
	if err != nil {
		return usagef("loss: want a percentage such as 1%%, got %q", *loss)
	}
	bps, err := parseRate(*rate)
	if err != nil {
		return usagef("rate: %v", err)
	}
	dir := netemu.Direction{
		Delay: *delay, Jitter: *jitter, Loss: pct / 100, Burst: *burst,
		Rate: bps, RateQueue: *rateQueue, Limit: *limit, Seed: *seed,
	}
	back := dir
	back.Seed = *seed + 1
	if err := dir.Validate(); err != nil {
		return usageError{err}
	}
	a, err := netemu.OpenTUN(*nsA, *devA)
	if err != nil {
		return err
	}
	b, err := netemu.OpenTUN(*nsB, *devB)
	if err != nil {
		a.Close()
		return err
	}
	l, err := netemu.New(a, b, netemu.Config{AToB: dir, BToA: back}, log)
	if err != nil {
		a.Close()
		b.Close()
		return err
	}
	log.Info("netemu running", "a", *devA, "b", *devB, "delay", *delay, "jitter", *jitter,
		"loss", dir.Loss, "burst", dir.Burst, "rate_bps", dir.Rate, "rate_queue", dir.RateQueue)
	start := time.Now()
	err = l.Run(ctx)
	ab, ba := l.Stats()
	for _, d := range []struct {
		name string
		s    netemu.Stats
	}{{"a_to_b", ab}, {"b_to_a", ba}} {
		fmt.Fprintf(stdout, "netemu %s: %d received, %d lost, %d overflow, %d delivered, %d write errors in %s\n",
			d.name, d.s.Received, d.s.Lost, d.s.Overflow, d.s.Delivered, d.s.WriteErrs, time.Since(start).Round(time.Millisecond))
	}
	return err
}

// parseRate reads a bandwidth as tc writes one: a whole number of bits per
// second, bare or with a unit (10mbit, 500kbit, 1gbit). Empty or 0 is no
// limit.
func parseRate(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	num, mult := strings.ToLower(s), int64(1)
	// tc's units, which are decimal.
	for _, u := range []struct {
		suffix string
		bps    int64
	}{{"gbit", 1e9}, {"mbit", 1e6}, {"kbit", 1e3}, {"bit", 1}} {
		if n, ok := strings.CutSuffix(num, u.suffix); ok {
			num, mult = n, u.bps
			break
		}
	}
	// Digits only: ParseInt would take a sign, which a rate never has.
	if num == "" || strings.Trim(num, "0123456789") != "" {
		return 0, fmt.Errorf("want bits per second such as 10mbit, 500kbit, 1gbit or 2000000, got %q", s)
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("%q is more bits per second than fit in 64 bits", s)
	}
	return n * mult, nil
}
