package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"
)

// scrape returns the whole /metrics text.
func scrape(t *testing.T, s *server) string {
	t.Helper()
	resp, err := http.Get(s.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestEndToEndMetricsAfterTraffic sends real completions over HTTP/3 and
// HTTP/2 and checks that the scrape moved by what was sent, and that the
// whole exposition passes promtool.
func TestEndToEndMetricsAfterTraffic(t *testing.T) {
	s := startServer(t)
	h3, h2 := s.h3Client(t), s.h2Client(t)
	ctx := context.Background()
	completion := 0
	send := func(c *http.Client, urgency string) {
		t.Helper()
		b, _ := jsonBody(chatBody(12, true))
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.base+"/v1/chat/completions", bytes.NewReader(b))
		req.Header.Set("Content-Type", "application/json")
		if urgency != "" {
			req.Header.Set("Priority", urgency)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		r := readStream(t, resp)
		last := r.chunks[len(r.chunks)-1]
		if last.Usage == nil {
			t.Fatal("no usage chunk")
		}
		completion += last.Usage.CompletionTokens
	}
	for range 3 {
		send(h3, "")
	}
	send(h3, "u=1")
	send(h2, "")

	text := scrape(t, s)
	for _, c := range []struct {
		name string
		want float64
	}{
		{`h3infer_http_requests_total{protocol="h3",route="/v1/chat/completions",status="200"}`, 4},
		{`h3infer_http_requests_total{protocol="h2",route="/v1/chat/completions",status="200"}`, 1},
		{`h3infer_time_to_first_token_seconds_count{model="demo",urgency="3"}`, 4},
		{`h3infer_time_to_first_token_seconds_count{model="demo",urgency="1"}`, 1},
		{`h3infer_request_duration_seconds_count{model="demo",urgency="3"}`, 4},
		{`h3infer_queue_wait_seconds_count{model="demo",urgency="1"}`, 1},
		{`h3infer_queue_depth{urgency="3"}`, 0},
		{`h3infer_scheduler_refusals_total{reason="predicted_delay"}`, 0},
		{`h3infer_scheduler_queue_delay_seconds_count`, 5},
		// Each worker step sends one token event: all but the first of a
		// request are inter-token gaps.
		{`h3infer_inter_token_latency_seconds_count`, float64(completion - 5)},
		{`h3infer_stream_tokens_total`, float64(completion)},
	} {
		if got := sum(t, text, c.name); got != c.want {
			t.Errorf("%s = %v, want %v", c.name, got, c.want)
		}
	}
	// Workers report their counters every 100ms.
	deadline := time.Now().Add(10 * time.Second)
	for {
		text = scrape(t, s)
		if sum(t, text, "h3infer_worker_tokens_generated_total") >= float64(completion) &&
			sum(t, text, "h3infer_worker_in_flight_sequences") == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker counters did not catch up:\n%s", grepLines(text, "h3infer_worker_"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Idle workers sleep on their request ring, so each request rang at
	// least one doorbell; once all is answered the rings are empty.
	if got := sum(t, text, "h3infer_worker_ring_wakeups_total"); got < 1 {
		t.Errorf("h3infer_worker_ring_wakeups_total = %v after traffic to sleeping workers, want > 0", got)
	}
	// Nothing is sent toward a worker once every request is answered (the
	// other direction carries the workers' periodic reports).
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, "h3infer_worker_ring_bytes{") && strings.Contains(l, `direction="to_worker"`) && !strings.HasSuffix(l, " 0") {
			t.Errorf("%s with nothing in flight, want 0", l)
		}
	}
	if !strings.Contains(text, `h3infer_worker_ring_bytes{direction="to_gateway",worker="0"}`) {
		t.Errorf("h3infer_worker_ring_bytes has no to_gateway series for worker 0")
	}
	for _, name := range []string{"h3infer_quic_connections_total", "h3infer_quic_packets_sent_total", "h3infer_quic_packets_received_total"} {
		if sum(t, text, name) < 1 {
			t.Errorf("%s did not move", name)
		}
	}
	t.Logf("excerpt of /metrics after the traffic:\n%s", grepLines(text,
		`h3infer_http_requests_total{`, "h3infer_time_to_first_token_seconds_count", "h3infer_time_to_first_token_seconds_sum",
		"h3infer_inter_token_latency_seconds_count", "h3infer_inter_token_latency_seconds_sum",
		"h3infer_stream_tokens_total ", "h3infer_worker_tokens_generated_total", "h3infer_quic_"))
	promtool(t, text)
	checkDeployFiles(t, text)
}

// checkDeployFiles holds deploy/ to the real exposition: every metric the
// Grafana dashboard queries exists, and the scrape config is valid.
func checkDeployFiles(t *testing.T, exposition string) {
	t.Helper()
	raw, err := os.ReadFile("../../deploy/grafana/h3infer.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard: %v", err)
	}
	name := regexp.MustCompile(`h3infer_[a-z0-9_]+`)
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, m := range name.FindAllString(tg.Expr, -1) {
				family := m
				for _, suffix := range []string{"_bucket", "_sum", "_count"} {
					if f, ok := strings.CutSuffix(m, suffix); ok && strings.Contains(exposition, "# TYPE "+f+" histogram") {
						family = f
					}
				}
				if !strings.Contains(exposition, "# TYPE "+family+" ") {
					t.Errorf("dashboard panel %q queries %s, which /metrics does not expose", p.Title, m)
				}
			}
		}
	}
	out, err := exec.Command("promtool", "check", "config", "../../deploy/prometheus.yml").CombinedOutput()
	if err != nil {
		t.Errorf("promtool check config deploy/prometheus.yml: %v\n%s", err, out)
	}
}

func jsonBody(v any) ([]byte, error) { return json.Marshal(v) }

// sum adds up every sample whose series starts with name (a family name,
// or a full series with its labels).
func sum(t *testing.T, text, name string) float64 {
	t.Helper()
	total := 0.0
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name) || strings.HasPrefix(line, "#") {
			continue
		}
		rest := line[len(name):]
		if !strings.HasPrefix(rest, " ") && !strings.HasPrefix(rest, "{") {
			continue
		}
		var v float64
		f := strings.Fields(line)
		if _, err := fmt.Sscan(f[len(f)-1], &v); err != nil {
			t.Fatalf("sample %q: %v", line, err)
		}
		total += v
	}
	return total
}

func grepLines(text string, prefixes ...string) string {
	var out []string
	for _, line := range strings.Split(text, "\n") {
		for _, p := range prefixes {
			if strings.HasPrefix(line, p) {
				out = append(out, line)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}

func promtool(t *testing.T, text string) {
	t.Helper()
	bin, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not found (apt-get install prometheus): %v", err)
	}
	cmd := exec.Command(bin, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// otlpReceiver is an OTLP/HTTP traces endpoint on loopback that keeps
// every span it is sent, with its exporting process's resource.
type otlpReceiver struct {
	srv   *httptest.Server
	mu    sync.Mutex
	spans []receivedSpan
}

type receivedSpan struct {
	service string
	pid     int64
	span    *tracepb.Span
}

func newOTLPReceiver(t *testing.T) *otlpReceiver {
	r := &otlpReceiver{}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		var body io.Reader = req.Body
		if req.Header.Get("Content-Encoding") == "gzip" {
			gz, err := gzip.NewReader(req.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			body = gz
		}
		b, err := io.ReadAll(body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		var msg coltracepb.ExportTraceServiceRequest
		if err := proto.Unmarshal(b, &msg); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.mu.Lock()
		for _, rs := range msg.ResourceSpans {
			var rec receivedSpan
			for _, kv := range rs.GetResource().GetAttributes() {
				switch kv.Key {
				case "service.name":
					rec.service = kv.Value.GetStringValue()
				case "process.pid":
					rec.pid = kv.Value.GetIntValue()
				}
			}
			for _, ss := range rs.ScopeSpans {
				for _, sp := range ss.Spans {
					rec.span = sp
					r.spans = append(r.spans, rec)
				}
			}
		}
		r.mu.Unlock()
		out, _ := proto.Marshal(&coltracepb.ExportTraceServiceResponse{})
		w.Header().Set("Content-Type", "application/x-protobuf")
		w.Write(out)
	}))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *otlpReceiver) trace(id []byte) []receivedSpan {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []receivedSpan
	for _, s := range r.spans {
		if bytes.Equal(s.span.TraceId, id) {
			out = append(out, s)
		}
	}
	return out
}

// TestEndToEndTraceAcrossRing exports spans from the gateway and from the
// worker process to a real OTLP/HTTP receiver and checks that the worker's
// prefill and decode spans are children of the gateway's server span,
// which itself continues the client's traceparent.
func TestEndToEndTraceAcrossRing(t *testing.T) {
	recv := newOTLPReceiver(t)
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", recv.srv.URL)
	t.Setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
	s := startServer(t)

	traceID, _ := hex.DecodeString("4bf92f3577b34da6a3ce929d0e0e4736")
	parentID, _ := hex.DecodeString("00f067aa0ba902b7")
	b, _ := jsonBody(chatBody(6, true))
	req, _ := http.NewRequest(http.MethodPost, s.base+"/v1/chat/completions", bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	resp, err := s.h3Client(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	r := readStream(t, resp)
	completion := r.chunks[len(r.chunks)-1].Usage.CompletionTokens

	byName := map[string]receivedSpan{}
	deadline := time.Now().Add(30 * time.Second)
	for {
		for _, sp := range recv.trace(traceID) {
			byName[sp.span.Name] = sp
		}
		_, a := byName["POST /v1/chat/completions"]
		_, b := byName["prefill"]
		_, c := byName["decode"]
		if a && b && c {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("spans of the trace after 30s: %v", names(recv.trace(traceID)))
		}
		time.Sleep(50 * time.Millisecond)
	}
	server := byName["POST /v1/chat/completions"]
	if server.service != "h3infer" || !bytes.Equal(server.span.ParentSpanId, parentID) {
		t.Errorf("server span from %q with parent %x; want h3infer continuing %x", server.service, server.span.ParentSpanId, parentID)
	}
	if server.span.Kind != tracepb.Span_SPAN_KIND_SERVER {
		t.Errorf("server span kind %v", server.span.Kind)
	}
	var tokens int64 = -1
	ttft := -1.0
	for _, kv := range server.span.Attributes {
		switch kv.Key {
		case "h3infer.completion_tokens":
			tokens = kv.Value.GetIntValue()
		case "h3infer.time_to_first_token_s":
			ttft = kv.Value.GetDoubleValue()
		}
	}
	if tokens != int64(completion) {
		t.Errorf("h3infer.completion_tokens = %d, want %d", tokens, completion)
	}
	if ttft <= 0 {
		t.Errorf("h3infer.time_to_first_token_s = %v, want > 0", ttft)
	}
	if !hasEvent(server.span, "dispatched") {
		t.Error("server span lacks the dispatched event")
	}
	if adm, ok := byName["admission"]; !ok || !bytes.Equal(adm.span.ParentSpanId, server.span.SpanId) {
		t.Errorf("admission span missing or not a child of the server span")
	}
	for _, name := range []string{"prefill", "decode"} {
		w := byName[name]
		if w.service != "h3infer-worker" || w.pid == 0 || w.pid == server.pid {
			t.Errorf("%s span from service %q pid %d; want the worker process (gateway pid %d)", name, w.service, w.pid, server.pid)
		}
		if !bytes.Equal(w.span.ParentSpanId, server.span.SpanId) {
			t.Errorf("%s span's parent %x, want the server span %x", name, w.span.ParentSpanId, server.span.SpanId)
		}
	}
	if byName["prefill"].span.EndTimeUnixNano > byName["decode"].span.StartTimeUnixNano {
		t.Error("decode started before prefill ended")
	}
	t.Logf("span tree:\n%s", tree(recv.trace(traceID), parentID))

	// A client that leaves mid-stream: the gateway's span and the worker's
	// decode span both say the request was cancelled.
	cancelTrace, _ := hex.DecodeString("5cf92f3577b34da6a3ce929d0e0e4737")
	ctx, cancel := context.WithCancel(context.Background())
	b, _ = jsonBody(longStreamBody())
	req, _ = http.NewRequestWithContext(ctx, http.MethodPost, s.base+"/v1/completions", bytes.NewReader(b))
	req.Header.Set("traceparent", "00-5cf92f3577b34da6a3ce929d0e0e4737-00f067aa0ba902b7-01")
	resp, err = s.h3Client(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	cancel()
	resp.Body.Close()
	deadline = time.Now().Add(30 * time.Second)
	for {
		var serverCancelled, workerCancelled bool
		for _, sp := range recv.trace(cancelTrace) {
			switch {
			case sp.service == "h3infer" && sp.span.Kind == tracepb.Span_SPAN_KIND_SERVER:
				serverCancelled = hasEvent(sp.span, "cancelled")
			case sp.service == "h3infer-worker" && sp.span.Name == "decode":
				workerCancelled = hasEvent(sp.span, "cancelled")
			}
		}
		if serverCancelled && workerCancelled {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("cancelled request: server span cancelled=%v, worker decode cancelled=%v; spans %v",
				serverCancelled, workerCancelled, names(recv.trace(cancelTrace)))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func hasEvent(sp *tracepb.Span, name string) bool {
	for _, e := range sp.Events {
		if e.Name == name {
			return true
		}
	}
	return false
}

func names(spans []receivedSpan) []string {
	var out []string
	for _, s := range spans {
		out = append(out, s.service+":"+s.span.Name)
	}
	return out
}

// tree renders the spans under root as an indented list.
func tree(spans []receivedSpan, root []byte) string {
	var b strings.Builder
	var walk func(parent []byte, depth int)
	walk = func(parent []byte, depth int) {
		var kids []receivedSpan
		for _, s := range spans {
			if bytes.Equal(s.span.ParentSpanId, parent) {
				kids = append(kids, s)
			}
		}
		sort.Slice(kids, func(i, j int) bool { return kids[i].span.StartTimeUnixNano < kids[j].span.StartTimeUnixNano })
		for _, k := range kids {
			d := time.Duration(k.span.EndTimeUnixNano - k.span.StartTimeUnixNano)
			var events []string
			for _, e := range k.span.Events {
				events = append(events, e.Name)
			}
			fmt.Fprintf(&b, "%s%s [%s pid %d] %v events=%v\n", strings.Repeat("  ", depth), k.span.Name, k.service, k.pid, d.Round(time.Microsecond), events)
			walk(k.span.SpanId, depth+1)
		}
	}
	walk(root, 0)
	return b.String()
}
