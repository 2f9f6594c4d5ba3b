package gateway

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"h3infer/config"
	"h3infer/infer"
	"h3infer/priority"
	"h3infer/scheduler"
)

const chatStream = `{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true}`

func TestPriorityAndTenantReachScheduler(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.Tenant = func(r *http.Request) string { return "tenant-of-" + r.URL.Query().Get("who") }
	})
	tests := map[string]struct {
		priority    string
		wantUrgency priority.Urgency
		wantDefault bool
	}{
		"no header":    {"", 3, true},
		"urgent":       {"u=0", 0, false},
		"bulk, incr":   {"u=6, i", 6, false},
		"only i":       {"i", 3, true},
		"out of range": {"u=8", 3, true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			var hdr []string
			if tc.priority != "" {
				hdr = []string{"Priority", tc.priority}
			}
			start := time.Now()
			resp := h.post(t, "h3", "/v1/chat/completions?who=x", chatStream, hdr...)
			io.Copy(io.Discard, resp.Body)
			got, _ := h.sched.last()
			if got.Urgency != tc.wantUrgency || got.DefaultUrgency != tc.wantDefault {
				t.Errorf("scheduler got urgency %d default %v, want %d %v", got.Urgency, got.DefaultUrgency, tc.wantUrgency, tc.wantDefault)
			}
			if got.Tenant != "tenant-of-x" {
				t.Errorf("tenant %q, want the one Config.Tenant named", got.Tenant)
			}
			if d := got.Deadline.Sub(start); d < DefaultQueueTimeout-time.Second || d > DefaultQueueTimeout+time.Second {
				t.Errorf("deadline %s after the request, want the default %s", d, DefaultQueueTimeout)
			}
		})
	}
}

func TestDeadlineHeader(t *testing.T) {
	h := newHarness(t, nil)
	for _, v := range []string{"1500ms", "2"} {
		start := time.Now()
		resp := h.post(t, "h2", "/v1/chat/completions", chatStream, "X-Request-Timeout", v)
		io.Copy(io.Discard, resp.Body)
		got, _ := h.sched.last()
		want, _ := time.ParseDuration(v)
		if want == 0 {
			n, _ := strconv.Atoi(v)
			want = time.Duration(n) * time.Second
		}
		if d := got.Deadline.Sub(start); d < want-500*time.Millisecond || d > want+500*time.Millisecond {
			t.Errorf("X-Request-Timeout %s: deadline %s after the request", v, d)
		}
	}
}

// A stream still running at its deadline ends with an error event, and the
// worker's sequence is cancelled.
func TestDeadlineDuringStream(t *testing.T) {
	h := newHarness(t, nil)
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
		return tokens("slow"), nil // and then nothing: the worker stalls
	})
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			resp := h.post(t, proto, "/v1/chat/completions", chatStream, "X-Request-Timeout", "300ms")
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d", resp.StatusCode)
			}
			events := sseEvents(t, resp.Body)
			if len(events) != 3 {
				t.Fatalf("events %q, want role, token, error", events)
			}
			var last struct {
				Error *errorObject `json:"error"`
			}
			if err := json.Unmarshal([]byte(events[2]), &last); err != nil || last.Error == nil || deref(last.Error.Code) != "timeout" {
				t.Fatalf("last event %q, want a timeout error object", events[2])
			}
			_, st := h.sched.last()
			select {
			case <-st.closed:
			case <-time.After(5 * time.Second):
				t.Fatal("the stream was not closed at its deadline")
			}
		})
	}
}

// dataWrites reads the DATA-write histogram's sum for one urgency.
func dataWrites(t *testing.T, h *harness, urgency string) float64 {
	t.Helper()
	r, err := http.Get(h.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	prefix := `h3infer_stream_data_writes_sum{urgency="` + urgency + `"} `
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	return 0
}

// Tokens that arrive together are written together at low urgency, one by
// one at high urgency; both streams carry the same events.
func TestCoalescingByUrgency(t *testing.T) {
	h := newHarness(t, nil)
	const n = 40
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
		var texts []string
		for i := range n {
			texts = append(texts, "t"+strconv.Itoa(i)+" ")
		}
		return append(tokens(texts...), done(infer.FinishLength, 2, n)), nil
	})
	var bodies []string
	for _, u := range []string{"0", "6"} {
		resp := h.post(t, "h3", "/v1/chat/completions", chatStream, "Priority", "u="+u)
		events := sseEvents(t, resp.Body)
		if len(events) != n+3 || events[len(events)-1] != "[DONE]" {
			t.Fatalf("u=%s: %d events, want role, %d tokens, finish, [DONE]", u, len(events), n)
		}
		var text bytes.Buffer
		for _, e := range events[1 : n+1] {
			var c streamChunk
			if err := json.Unmarshal([]byte(e), &c); err != nil {
				t.Fatal(err)
			}
			text.WriteString(*c.Choices[0].Delta.Content)
		}
		bodies = append(bodies, text.String())
	}
	if bodies[0] != bodies[1] {
		t.Errorf("coalescing changed the text: %q vs %q", bodies[0], bodies[1])
	}
	// The handler observes the histogram as it returns, just after the
	// client read the end.
	var urgent, bulk float64
	deadline := time.Now().Add(5 * time.Second)
	for urgent == 0 || bulk == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("DATA write counts missing: u=0 %v, u=6 %v", urgent, bulk)
		}
		time.Sleep(5 * time.Millisecond)
		urgent, bulk = dataWrites(t, h, "0"), dataWrites(t, h, "6")
	}
	if urgent < n {
		t.Errorf("u=0 made %v DATA writes for %d tokens, want one per token at least", urgent, n)
	}
	// First token at once, the rest held (4 KiB and 25 ms are far off) and
	// written with the end.
	if bulk > 4 {
		t.Errorf("u=6 made %v DATA writes for %d tokens arriving together, want a few", bulk, n)
	}
}

func TestCoalescer(t *testing.T) {
	var writes []string
	out := func(b []byte) error { writes = append(writes, string(b)); return nil }

	c := newCoalescer(0, 100, out)
	c.add([]byte("a"), false)
	c.add([]byte("b"), false)
	if len(writes) != 2 || c.C() != nil {
		t.Errorf("without a window: writes %q, want one per add", writes)
	}
	c.stop()

	writes = nil
	c = newCoalescer(time.Hour, 8, out)
	defer c.stop()
	c.add([]byte("abc"), false)
	c.add([]byte("de"), false)
	if len(writes) != 0 || c.C() == nil {
		t.Fatalf("within the window: writes %q and no timer armed", writes)
	}
	c.add([]byte("fgh"), false) // 8 bytes: the limit
	if len(writes) != 1 || writes[0] != "abcdefgh" || c.C() != nil {
		t.Fatalf("at the size limit: writes %q, want one of everything held and the timer off", writes)
	}
	c.add([]byte("x"), false)
	c.add([]byte("!"), true)
	if len(writes) != 2 || writes[1] != "x!" || c.writes != 2 {
		t.Fatalf("forced: writes %q (%d counted), want x! flushed", writes, c.writes)
	}
	if err := c.flush(); err != nil || len(writes) != 2 {
		t.Errorf("flushing nothing wrote %q", writes)
	}

	// The timer fires once the window ends.
	c2 := newCoalescer(5*time.Millisecond, 1<<20, out)
	defer c2.stop()
	c2.add([]byte("late"), false)
	select {
	case <-c2.C():
		c2.flush()
	case <-time.After(5 * time.Second):
		t.Fatal("window timer never fired")
	}
	if writes[len(writes)-1] != "late" {
		t.Errorf("writes %q, want the held bytes after the window", writes)
	}
}

func TestCoalesceConfigValidates(t *testing.T) {
	tests := map[string]struct {
		cfg  CoalesceConfig
		want string
	}{
		"window beyond ack delay":      {CoalesceConfig{Window: config.Duration(30 * time.Millisecond)}, "gateway.coalesce.window"},
		"bulk window beyond ack delay": {CoalesceConfig{BulkWindow: config.Duration(26 * time.Millisecond)}, "gateway.coalesce.bulk_window"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			errs := tc.cfg.WithDefaults().validate()
			if len(errs) == 0 || !strings.Contains(errs[0].Error(), tc.want) {
				t.Errorf("errors %v, want one naming %s", errs, tc.want)
			}
		})
	}
	// The classes' bounds are checked where they live (priority); by the
	// default classes, u=0..2 flush at once, 3..5 hold 10ms, 6..7 25ms.
	c := CoalesceConfig{}.WithDefaults()
	errs := c.validate()
	want := [priority.Levels]time.Duration{0, 0, 0, 10 * time.Millisecond, 10 * time.Millisecond, 10 * time.Millisecond, 25 * time.Millisecond, 25 * time.Millisecond}
	for u := range priority.Urgency(priority.Levels) {
		if got := c.window(priority.DefaultClasses.Of(u)); len(errs) != 0 || got != want[u] {
			t.Errorf("defaults %+v (%v): u=%d holds %s, want %s", c, errs, u, got, want[u])
		}
	}
}
