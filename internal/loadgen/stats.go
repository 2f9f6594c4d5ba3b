package loadgen

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Percentiles summarizes a set of latencies. Count 0 leaves the rest zero.
type Percentiles struct {
	Count int           `json:"count"`
	P50   time.Duration `json:"p50_ns"`
	P90   time.Duration `json:"p90_ns"`
	P99   time.Duration `json:"p99_ns"`
	Max   time.Duration `json:"max_ns"`
	Mean  time.Duration `json:"mean_ns"`
}

// percentile is the nearest-rank percentile (0 < p <= 1) of sorted data:
// the smallest value with at least p of the data at or below it.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

// summarize sorts d in place and summarizes it.
func summarize(d []time.Duration) Percentiles {
	if len(d) == 0 {
		return Percentiles{}
	}
	slices.Sort(d)
	var sum float64
	for _, v := range d {
		sum += float64(v)
	}
	return Percentiles{
		Count: len(d),
		P50:   percentile(d, 0.50),
		P90:   percentile(d, 0.90),
		P99:   percentile(d, 0.99),
		Max:   d[len(d)-1],
		Mean:  time.Duration(sum / float64(len(d))),
	}
}

// Result is a finished run: its settings, summaries and raw latencies.
type Result struct {
	Label       string  `json:"label,omitempty"`
	Proto       string  `json:"proto"`
	Concurrency int     `json:"concurrency"`
	Rate        float64 `json:"rate,omitempty"`
	NewConn     bool    `json:"new_connection"`
	ZeroRTT     bool    `json:"zero_rtt"`
	Requests    int     `json:"requests"`
	OK          int     `json:"ok"`
	// Early and Retried count successful requests served in 0-RTT, and
	// those whose 0-RTT was refused and sent again in 1-RTT.
	Early      int            `json:"early"`
	Retried    int            `json:"retried"`
	Errors     map[string]int `json:"errors"`
	Wall       time.Duration  `json:"wall_ns"`
	Tokens     int            `json:"tokens"`
	TokensPerS float64        `json:"tokens_per_s"`
	RequestsPS float64        `json:"requests_per_s"`
	TTFT       Percentiles    `json:"ttft"`
	ITL        Percentiles    `json:"itl"`
	E2E        Percentiles    `json:"e2e"`
	// Refused is the latency of refusals (503 and 429, also counted in
	// Errors): from sending the request to the refusal's headers.
	// RetryAfter counts the Retry-After values they carried, in seconds
	// (-1: missing or not a number).
	Refused    Percentiles `json:"refused"`
	RetryAfter map[int]int `json:"retry_after_s,omitempty"`

	// Sorted raw latencies of successful requests, for plots.
	TTFTs []time.Duration `json:"-"`
	ITLs  []time.Duration `json:"-"`
	E2Es  []time.Duration `json:"-"`
	// Sorted latencies of refusals.
	Refusals []time.Duration `json:"-"`
	// Samples in the order they finished.
	Samples []Sample `json:"-"`
	// ErrorDetails holds one message per error kind, for diagnosis.
	ErrorDetails map[string]string `json:"error_details,omitempty"`
	// ServerCPU is the CPU time the server's processes used during the
	// run (ProcessCPU, set by the caller that knows the server's pid),
	// and CPUPerToken that over Tokens; zero when not measured.
	ServerCPU   time.Duration `json:"server_cpu_ns,omitempty"`
	CPUPerToken time.Duration `json:"server_cpu_per_token_ns,omitempty"`
}

func newResult(cfg Config, samples []Sample, wall time.Duration) *Result {
	r := &Result{
		Proto:        cfg.Proto,
		Concurrency:  cfg.Concurrency,
		Rate:         cfg.Rate,
		NewConn:      cfg.NewConnection,
		ZeroRTT:      cfg.ZeroRTT,
		Requests:     len(samples),
		Errors:       map[string]int{},
		ErrorDetails: map[string]string{},
		Wall:         wall,
		Samples:      samples,
	}
	for _, s := range samples {
		if s.Refused() {
			r.Refusals = append(r.Refusals, s.E2E)
			if r.RetryAfter == nil {
				r.RetryAfter = map[int]int{}
			}
			r.RetryAfter[s.RetryAfter]++
		}
		if s.Err != "" {
			r.Errors[s.Err]++
			if _, seen := r.ErrorDetails[s.Err]; !seen && s.Detail != "" {
				r.ErrorDetails[s.Err] = s.Detail
			}
			continue
		}
		r.OK++
		if s.Early {
			r.Early++
		}
		if s.Retried {
			r.Retried++
		}
		r.Tokens += s.Tokens
		if s.TTFT > 0 { // an empty completion has no first token
			r.TTFTs = append(r.TTFTs, s.TTFT)
		}
		r.E2Es = append(r.E2Es, s.E2E)
		r.ITLs = append(r.ITLs, s.ITL...)
	}
	r.TTFT, r.ITL, r.E2E = summarize(r.TTFTs), summarize(r.ITLs), summarize(r.E2Es)
	r.Refused = summarize(r.Refusals)
	if secs := wall.Seconds(); secs > 0 {
		r.TokensPerS = float64(r.Tokens) / secs
		r.RequestsPS = float64(r.OK) / secs
	}
	return r
}

// ErrorCount is the number of failed requests of every kind.
func (r *Result) ErrorCount() int { return r.Requests - r.OK }

// WriteTable prints the run as a human-readable table.
func (r *Result) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	mode := fmt.Sprintf("concurrency %d", r.Concurrency)
	if r.Rate > 0 {
		mode = fmt.Sprintf("rate %.1f/s (at most %d in flight)", r.Rate, r.Concurrency)
	}
	if r.NewConn {
		mode += ", new connection per request"
		if r.ZeroRTT {
			mode += ", 0-RTT"
		}
	}
	title := r.Proto
	if r.Label != "" {
		title = r.Label + " (" + r.Proto + ")"
	}
	fmt.Fprintf(w, "%s, %s: %d requests, %d ok, %d errors in %s\n", title, mode, r.Requests, r.OK, r.ErrorCount(), r.Wall.Round(time.Millisecond))
	fmt.Fprintf(tw, "latency\tp50\tp90\tp99\tmax\tsamples\t\n")
	for _, row := range []struct {
		name string
		p    Percentiles
	}{{"ttft", r.TTFT}, {"inter-token", r.ITL}, {"e2e", r.E2E}, {"refused", r.Refused}} {
		if row.name == "refused" && row.p.Count == 0 {
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t\n", row.name, fmtDur(row.p.P50), fmtDur(row.p.P90), fmtDur(row.p.P99), fmtDur(row.p.Max), row.p.Count)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(w, "throughput: %.1f tokens/s, %.2f requests/s (%d tokens)\n", r.TokensPerS, r.RequestsPS, r.Tokens)
	if len(r.RetryAfter) > 0 {
		var parts []string
		for _, v := range slices.Sorted(maps.Keys(r.RetryAfter)) {
			parts = append(parts, fmt.Sprintf("%s ×%d", fmtRetryAfter(v), r.RetryAfter[v]))
		}
		fmt.Fprintf(w, "retry-after of %d refusals: %s\n", r.Refused.Count, strings.Join(parts, ", "))
	}
	if r.ZeroRTT {
		fmt.Fprintf(w, "0-RTT: %d of %d ok requests served early, %d retried in 1-RTT\n", r.Early, r.OK, r.Retried)
	}
	if len(r.Errors) == 0 {
		_, err := fmt.Fprintln(w, "errors: none")
		return err
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(r.Errors)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, r.Errors[k]))
	}
	_, err := fmt.Fprintf(w, "errors: %s\n", strings.Join(parts, ", "))
	for _, k := range slices.Sorted(maps.Keys(r.ErrorDetails)) {
		fmt.Fprintf(w, "  %s: %s\n", k, r.ErrorDetails[k])
	}
	return err
}

// fmtRetryAfter prints a Retry-After value a Sample recorded.
func fmtRetryAfter(v int) string {
	if v < 0 {
		return "none"
	}
	return fmt.Sprintf("%ds", v)
}

// fmtDur prints a latency with three significant digits.
func fmtDur(d time.Duration) string {
	switch {
	case d == 0:
		return "-"
	case d < time.Millisecond:
		return fmt.Sprintf("%.1fµs", float64(d)/1e3)
	case d < time.Second:
		return fmt.Sprintf("%.2fms", float64(d)/1e6)
	}
	return fmt.Sprintf("%.3fs", d.Seconds())
}

// WriteJSON writes results as one JSON document.
func WriteJSON(w io.Writer, results []*Result) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(struct {
		Runs []*Result `json:"runs"`
	}{results})
}
