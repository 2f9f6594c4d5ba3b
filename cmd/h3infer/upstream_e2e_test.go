package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
)

// The edge in front of a regional tier: two real `h3infer serve`
// processes with real ONNX Runtime workers. The regional tier serves the
// model "big", which the edge has no worker for; the edge serves "demo"
// itself and forwards "big" upstream.

const regionalModel = "big"

// tiers is an edge gateway and the regional gateway it forwards to.
type tiers struct {
	edge, regional *server
}

// startTiers starts a regional tier serving regionalModel and an edge
// whose upstream is that tier over proto ("h2" or "h3"). upstreamExtra
// adds keys to the edge's upstream entry; before lists upstreams the edge
// has ahead of the tier.
func startTiers(t *testing.T, proto string, upstreamExtra map[string]any, before ...any) tiers {
	t.Helper()
	regional, up := startRegional(t, proto)
	for k, v := range upstreamExtra {
		up[k] = v
	}
	edge := startServer(t, "--config", writeServeConfig(t, map[string]any{"upstreams": append(before, up)}))
	waitFor(t, "the edge to list the regional model", func() bool { return listsModel(t, edge, regionalModel) })
	return tiers{edge: edge, regional: regional}
}

// startRegional starts a regional tier serving regionalModel and returns
// the edge's upstream entry for it over proto.
func startRegional(t *testing.T, proto string) (*server, map[string]any) {
	t.Helper()
	bin := buildBinary(t)
	dir := t.TempDir()
	if out, err := exec.Command(bin, "genmodel", "--out", dir).CombinedOutput(); err != nil {
		t.Fatalf("genmodel: %v\n%s", err, out)
	}
	regional := startServer(t, "--config", writeServeConfig(t, map[string]any{
		"models": []map[string]any{{"name": regionalModel, "dir": dir}},
	}))
	return regional, upstreamEntry(t, regional, proto)
}

// upstreamEntry is the edge's upstream entry for regional over proto.
func upstreamEntry(t *testing.T, regional *server, proto string) map[string]any {
	t.Helper()
	// The edge presents a credential of the regional tier's, never its
	// clients' tokens.
	cred := filepath.Join(t.TempDir(), "regional.token")
	if err := os.WriteFile(cred, []byte(regional.bearer(t)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return map[string]any{
		"name":              "regional",
		"url":               regional.base,
		"protocol":          proto,
		"ca_file":           regional.caFile,
		"credential_file":   cred,
		"discover_interval": "200ms",
	}
}

// listsModel reports whether s's /v1/models lists model.
func listsModel(t *testing.T, s *server, model string) bool {
	t.Helper()
	c := s.h2Client(t)
	resp, err := c.Get(s.base + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var list struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatal(err)
	}
	for _, m := range list.Data {
		if m.ID == model {
			return true
		}
	}
	return false
}

func regionalChat(maxTokens int, stream bool) map[string]any {
	b := chatBody(maxTokens, stream)
	b["model"] = regionalModel
	return b
}

// TestUpstreamStreamsWhatTheRegionalTierGives: the text and usage streamed
// through the edge, over HTTP/2 and over HTTP/3 towards the regional
// tier, are those the regional tier gives its own clients directly, and
// the edge still serves its local model beside the upstream one.
func TestUpstreamStreamsWhatTheRegionalTierGives(t *testing.T) {
	for _, proto := range []string{"h2", "h3"} {
		t.Run(proto, func(t *testing.T) {
			tr := startTiers(t, proto, nil)
			ctx := context.Background()
			direct := readStream(t, postJSON(t, ctx, tr.regional.h3Client(t), tr.regional.base+"/v1/chat/completions", regionalChat(40, true)))
			if strings.TrimSpace(direct.text) == "" {
				t.Fatal("the regional tier produced no text; the comparison would prove nothing")
			}
			via := readStream(t, postJSON(t, ctx, tr.edge.h3Client(t), tr.edge.base+"/v1/chat/completions", regionalChat(40, true)))
			if via.text != direct.text {
				t.Errorf("through the edge:\n%q\ndirect:\n%q", via.text, direct.text)
			}
			if !via.done || via.finish != direct.finish {
				t.Errorf("through the edge: done %v finish %q; direct finish %q", via.done, via.finish, direct.finish)
			}
			du, vu := direct.chunks[len(direct.chunks)-1].Usage, via.chunks[len(via.chunks)-1].Usage
			if du == nil || vu == nil || *du != *vu {
				t.Errorf("usage through the edge %+v, direct %+v", vu, du)
			}
			// Not streamed, the edge collects the upstream's stream into
			// one answer.
			resp := postJSON(t, ctx, tr.edge.h2Client(t), tr.edge.base+"/v1/chat/completions", regionalChat(40, false))
			var whole struct {
				Choices []struct {
					Message struct {
						Content string `json:"content"`
					} `json:"message"`
				} `json:"choices"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&whole); err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("non-streamed through the edge: %s, %v", resp.Status, err)
			}
			resp.Body.Close()
			if len(whole.Choices) != 1 || whole.Choices[0].Message.Content != direct.text {
				t.Errorf("non-streamed through the edge: %+v, want %q", whole.Choices, direct.text)
			}
			// Logprobs come through as the regional tier gives them, in
			// both routes' shapes, whole and streamed.
			for _, stream := range []bool{false, true} {
				chat := regionalChat(12, stream)
				chat["logprobs"], chat["top_logprobs"] = true, 3
				text := map[string]any{"model": regionalModel, "prompt": testPrompt, "max_tokens": 12, "temperature": 0, "logprobs": 2, "stream": stream}
				for path, body := range map[string]map[string]any{"/v1/chat/completions": chat, "/v1/completions": text} {
					direct := logprobsOf(t, postJSON(t, ctx, tr.regional.h3Client(t), tr.regional.base+path, body))
					via := logprobsOf(t, postJSON(t, ctx, tr.edge.h3Client(t), tr.edge.base+path, body))
					if len(direct) == 0 || !reflect.DeepEqual(via, direct) {
						t.Errorf("%s stream %v: logprobs through the edge\n%v\ndirect\n%v", path, stream, via, direct)
					}
				}
			}
			// Several choices come through each under its index, as the
			// regional tier gives them.
			for _, stream := range []bool{false, true} {
				body := regionalChat(12, stream)
				body["n"], body["seed"], body["temperature"] = 3, 7, 1
				direct := choicesOf(t, postJSON(t, ctx, tr.regional.h3Client(t), tr.regional.base+"/v1/chat/completions", body))
				via := choicesOf(t, postJSON(t, ctx, tr.edge.h3Client(t), tr.edge.base+"/v1/chat/completions", body))
				if len(direct) != 3 || !reflect.DeepEqual(via, direct) {
					t.Errorf("n 3 stream %v: choices through the edge\n%v\ndirect\n%v", stream, via, direct)
				}
			}
			// The local model is the edge's own workers'.
			local := readStream(t, postJSON(t, ctx, tr.edge.h3Client(t), tr.edge.base+"/v1/chat/completions", chatBody(8, true)))
			if !local.done {
				t.Error("the edge's local model did not answer")
			}
			if n := metric(t, tr.edge, "h3infer_worker_sequences_started_total"); n != 1 {
				t.Errorf("the edge's workers started %v sequences, want 1 (the local request only)", n)
			}
		})
	}
}

// TestUpstreamUrgencyReachesRegional: a u=0 request at the edge is seen
// at the regional tier with urgency 0, and one that names none with the
// urgency the edge decided for it.
func TestUpstreamUrgencyReachesRegional(t *testing.T) {
	tr := startTiers(t, "h3", nil)
	c := tr.edge.h3Client(t)
	for _, u := range []int{0, 5} {
		b, _ := json.Marshal(regionalChat(4, true))
		req, _ := http.NewRequest(http.MethodPost, tr.edge.base+"/v1/chat/completions", strings.NewReader(string(b)))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Priority", fmt.Sprintf("u=%d", u))
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if r := readStream(t, resp); !r.done {
			t.Fatalf("u=%d: stream did not complete", u)
		}
		labels := fmt.Sprintf(`model=%q,urgency="%d"`, regionalModel, u)
		if n := sample(t, tr.regional, "h3infer_time_to_first_token_seconds_count", labels); n != 1 {
			t.Errorf("regional tier saw %v requests at urgency %d, want 1", n, u)
		}
	}
}

// TestUpstreamClientLeavingCancelsRegional: a client that goes away at
// the edge cancels the sequence at the regional tier, and the tier stops
// generating for it at once.
func TestUpstreamClientLeavingCancelsRegional(t *testing.T) {
	tr := startTiers(t, "h2", nil)
	before := metric(t, tr.regional, "h3infer_worker_sequences_cancelled_total")
	genBefore := metric(t, tr.regional, "h3infer_worker_tokens_generated_total")
	ctx, cancel := context.WithCancel(context.Background())
	body := longStreamBody()
	body["model"] = regionalModel
	resp := postJSON(t, ctx, tr.edge.h3Client(t), tr.edge.base+"/v1/completions", body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %s", resp.Status)
	}
	br := bufio.NewReader(resp.Body)
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	left := time.Now()
	cancel()
	resp.Body.Close()
	pollUntil(t, "the regional tier to cancel the sequence", 10*time.Second, func() bool {
		return metric(t, tr.regional, "h3infer_worker_sequences_cancelled_total") > before
	})
	took := time.Since(left)
	generated := metric(t, tr.regional, "h3infer_worker_tokens_generated_total") - genBefore
	if generated >= 1000 {
		t.Errorf("the regional tier generated all %v tokens of a request whose client left after its first event", generated)
	}
	// What the edge passed on to its client before it left; the rest was
	// generated for nobody.
	streamed := metric(t, tr.edge, "h3infer_stream_tokens_total")
	t.Logf("the regional tier's cancel showed within %v of the client leaving (polled every 20ms); it generated %v tokens, the edge streamed %v",
		took, generated, streamed)
}

// TestUpstreamLostMidStreamIsAnErrorEvent: when the regional tier dies
// mid-stream the client gets an explicit upstream_lost error event, never
// a stream that just stops.
func TestUpstreamLostMidStreamIsAnErrorEvent(t *testing.T) {
	tr := startTiers(t, "h2", nil)
	body := longStreamBody()
	body["model"] = regionalModel
	resp := postJSON(t, context.Background(), tr.edge.h3Client(t), tr.edge.base+"/v1/completions", body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %s", resp.Status)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	killServer(t, tr.regional)
	rest, err := io.ReadAll(br)
	if err != nil {
		t.Fatalf("the edge's stream broke instead of ending with an error event: %v", err)
	}
	end := readStreamEnd(&http.Response{StatusCode: http.StatusOK, Body: io.NopCloser(strings.NewReader(string(rest)))})
	if end.errCode != "upstream_lost" {
		t.Errorf("stream ended with %+v, want an upstream_lost error event\n%s", end, lastLines(string(rest), 3))
	}
}

// killServer ends a server and its workers with SIGKILL, as a crash
// would, and waits for it.
func killServer(t *testing.T, s *server) {
	t.Helper()
	workers := childPIDs(s.cmd.Process.Pid)
	s.cmd.Process.Kill()
	<-s.exited
	for _, pid := range workers {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	pollUntil(t, "the killed server's workers to exit", 10*time.Second, func() bool {
		for _, pid := range workers {
			if processAlive(pid) {
				return false
			}
		}
		return true
	})
	s.exitErr = nil // killed on purpose: the cleanup's exit check does not apply
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(len(lines)-n, 0):], "\n")
}

// refusingUpstream is an OpenAI-compatible server on loopback that lists
// models and answers every completion with 503 and a Retry-After: the one
// fault here a real tier is not made to produce on demand.
func refusingUpstream(t *testing.T, models ...string) (url string, posts *atomic.Int64) {
	t.Helper()
	posts = new(atomic.Int64)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && r.URL.Path == "/v1/models" {
			var data []map[string]string
			for _, m := range models {
				data = append(data, map[string]string{"id": m, "object": "model"})
			}
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(map[string]any{"object": "list", "data": data})
			return
		}
		posts.Add(1)
		w.Header().Set("Retry-After", "7")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, `{"error":{"message":"engine busy","type":"server_error","code":"overloaded"}}`)
	}))
	t.Cleanup(srv.Close)
	return srv.URL, posts
}

// TestUpstreamRefusalMovesToAnotherUpstream: an upstream that refuses a
// request before its first token (503) does not cost the client the
// request when another backend serves the model: the request moves to
// the regional tier. A model only the refusing upstream serves gets its
// 503 and Retry-After, in OpenAI's shape.
func TestUpstreamRefusalMovesToAnotherUpstream(t *testing.T) {
	busy, posts := refusingUpstream(t, regionalModel, "solo")
	tr := startTiers(t, "h2", nil, map[string]any{"name": "busy", "url": busy, "discover_interval": "200ms"})
	waitFor(t, "the edge to list the busy upstream's own model", func() bool { return listsModel(t, tr.edge, "solo") })
	c := tr.edge.h3Client(t)
	const n = 4
	for i := range n {
		r := readStream(t, postJSON(t, context.Background(), c, tr.edge.base+"/v1/chat/completions", regionalChat(4, true)))
		if !r.done {
			t.Fatalf("request %d did not complete", i)
		}
	}
	// Both upstreams are idle when each request arrives, so the first
	// listed, the busy one, is asked first every time.
	if got := posts.Load(); got != n {
		t.Errorf("the busy upstream was asked %d times, want %d (each request once, never twice)", got, n)
	}
	body := regionalChat(4, true)
	body["model"] = "solo"
	resp := postJSON(t, context.Background(), c, tr.edge.base+"/v1/chat/completions", body)
	defer resp.Body.Close()
	var e struct {
		Error struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	json.NewDecoder(resp.Body).Decode(&e)
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") != "7" || e.Error.Code != "overloaded" {
		t.Errorf("a model only the busy upstream serves: %s, Retry-After %q, code %q; want 503, 7, overloaded",
			resp.Status, resp.Header.Get("Retry-After"), e.Error.Code)
	}
}

// TestUpstreamsReloadOnSIGHUP: an upstream added to the file reaches
// clients on SIGHUP, and one removed takes no more requests.
func TestUpstreamsReloadOnSIGHUP(t *testing.T) {
	regional, up := startRegional(t, "h2")
	path := filepath.Join(t.TempDir(), "edge.json")
	writeConfigFile(t, path, map[string]any{})
	edge := startServer(t, "--config", path)
	c := edge.h3Client(t)
	ask := func() int {
		resp := postJSON(t, context.Background(), c, edge.base+"/v1/chat/completions", regionalChat(4, false))
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := ask(); got != http.StatusNotFound {
		t.Fatalf("before the upstream is configured: %d, want 404", got)
	}
	writeConfigFile(t, path, map[string]any{"upstreams": []any{up}})
	edge.cmd.Process.Signal(syscall.SIGHUP)
	waitLog(t, edge, "config reloaded", 1)
	waitFor(t, "the edge to list the regional model", func() bool { return listsModel(t, edge, regionalModel) })
	if got := ask(); got != http.StatusOK {
		t.Fatalf("after the reload added the upstream: %d, want 200", got)
	}
	if n := metric(t, regional, "h3infer_worker_sequences_started_total"); n != 1 {
		t.Errorf("the regional tier started %v sequences, want 1", n)
	}
	writeConfigFile(t, path, map[string]any{})
	edge.cmd.Process.Signal(syscall.SIGHUP)
	waitLog(t, edge, "config reloaded", 2)
	waitFor(t, "the edge to drop the regional model", func() bool { return !listsModel(t, edge, regionalModel) })
	if got := ask(); got != http.StatusNotFound {
		t.Errorf("after the reload removed the upstream: %d, want 404", got)
	}
}

// TestUpstreamTraceCrossesTheHop: one trace runs from the client through
// the edge's server span and its upstream span into the regional tier's
// server span and its worker's spans, and the upstream span says what
// urgency and priority mapping the request went upstream with.
func TestUpstreamTraceCrossesTheHop(t *testing.T) {
	recv := newOTLPReceiver(t)
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", recv.srv.URL)
	t.Setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
	tr := startTiers(t, "h2", nil)

	traceID, _ := hex.DecodeString("5bf92f3577b34da6a3ce929d0e0e4736")
	b, _ := json.Marshal(regionalChat(4, true))
	req, _ := http.NewRequest(http.MethodPost, tr.edge.base+"/v1/chat/completions", bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("traceparent", "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	req.Header.Set("Priority", "u=1")
	resp, err := tr.edge.h3Client(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if r := readStream(t, resp); !r.done {
		t.Fatal("stream did not complete")
	}

	edgePID, regionalPID := int64(tr.edge.cmd.Process.Pid), int64(tr.regional.cmd.Process.Pid)
	type key struct {
		pid  int64
		name string
	}
	spans := map[key]receivedSpan{}
	const server = "POST /v1/chat/completions"
	pollUntil(t, "the spans of both tiers", 30*time.Second, func() bool {
		for _, sp := range recv.trace(traceID) {
			spans[key{sp.pid, sp.span.Name}] = sp
		}
		_, a := spans[key{edgePID, server}]
		_, b := spans[key{edgePID, "upstream"}]
		_, c := spans[key{regionalPID, server}]
		return a && b && c
	})
	edgeServer, hop, regionalServer := spans[key{edgePID, server}], spans[key{edgePID, "upstream"}], spans[key{regionalPID, server}]
	if !bytes.Equal(hop.span.ParentSpanId, edgeServer.span.SpanId) || hop.span.Kind != tracepb.Span_SPAN_KIND_CLIENT {
		t.Errorf("upstream span: kind %v, parent %x; want a client span under the edge's server span %x", hop.span.Kind, hop.span.ParentSpanId, edgeServer.span.SpanId)
	}
	if !bytes.Equal(regionalServer.span.ParentSpanId, hop.span.SpanId) {
		t.Errorf("the regional tier's server span has parent %x, want the edge's upstream span %x", regionalServer.span.ParentSpanId, hop.span.SpanId)
	}
	attrs := map[string]any{}
	for _, kv := range hop.span.Attributes {
		attrs[kv.Key] = kv.Value.GetStringValue()
		if _, ok := kv.Value.Value.(*commonpb.AnyValue_IntValue); ok {
			attrs[kv.Key] = kv.Value.GetIntValue()
		}
	}
	if attrs["h3infer.upstream.priority"] != "off" || attrs["h3infer.urgency"] != int64(1) || attrs["h3infer.upstream.name"] != "regional" {
		t.Errorf("upstream span attributes %v; want name regional, urgency 1, priority off", attrs)
	}
}

// logprobsOf is the logprobs of a chat or text completion's first choice,
// whole or streamed, each token's entry as JSON gives it: chat's content
// entries, or a text completion's parallel lists read across.
func logprobsOf(t *testing.T, resp *http.Response) []any {
	t.Helper()
	docs := answerDocs(t, resp)
	var out []any
	for _, d := range docs {
		var doc struct {
			Choices []struct {
				Logprobs *struct {
					Content       []any     `json:"content"`
					Tokens        []string  `json:"tokens"`
					TokenLogprobs []float64 `json:"token_logprobs"`
					TopLogprobs   []any     `json:"top_logprobs"`
				} `json:"logprobs"`
			} `json:"choices"`
		}
		if err := json.Unmarshal(d, &doc); err != nil {
			t.Fatalf("%s: %v", d, err)
		}
		if len(doc.Choices) == 0 || doc.Choices[0].Logprobs == nil {
			continue
		}
		lp := doc.Choices[0].Logprobs
		out = append(out, lp.Content...)
		for i, tok := range lp.Tokens {
			out = append(out, []any{tok, lp.TokenLogprobs[i], lp.TopLogprobs[i]})
		}
	}
	return out
}

// choicesOf is a chat answer's choices, whole or streamed: each index's
// text and finish reason.
func choicesOf(t *testing.T, resp *http.Response) map[int][2]string {
	t.Helper()
	docs := answerDocs(t, resp)
	out := map[int][2]string{}
	for _, d := range docs {
		var doc struct {
			Choices []struct {
				Index   int `json:"index"`
				Message struct {
					Content string `json:"content"`
				} `json:"message"`
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
				FinishReason string `json:"finish_reason"`
			} `json:"choices"`
		}
		if err := json.Unmarshal(d, &doc); err != nil {
			t.Fatalf("%s: %v", d, err)
		}
		for _, c := range doc.Choices {
			o := out[c.Index]
			o[0] += c.Message.Content + c.Delta.Content
			if c.FinishReason != "" {
				o[1] = c.FinishReason
			}
			out[c.Index] = o
		}
	}
	return out
}

// TestUpstreamToolCallsAreTheRegionalTiers: a request with tools to a
// model the regional tier serves (Qwen 3's template, random weights)
// gets through the edge the calls the tier makes for it directly, whole
// and streamed; the call goes back into the history with its result.
func TestUpstreamToolCallsAreTheRegionalTiers(t *testing.T) {
	regional, model := startToolServer(t)
	up := upstreamEntry(t, regional, "h3")
	up["stall_timeout"] = slowDeadline // the regional tier's first call builds its vocabulary's trie
	edge := startServer(t, "--config", writeServeConfig(t, map[string]any{"upstreams": []any{up}, "gateway": map[string]any{"deadline": slowDeadline}}))
	waitFor(t, "the edge to list the regional model", func() bool { return listsModel(t, edge, model) })
	ctx := t.Context()
	var tools []any
	for _, name := range []string{"get_weather", "set_alarm"} {
		var params any
		if err := json.Unmarshal([]byte(toolSchemas[name]), &params); err != nil {
			t.Fatal(err)
		}
		tools = append(tools, map[string]any{"type": "function", "function": map[string]any{"name": name, "parameters": params}})
	}
	for seed := range 3 {
		for _, stream := range []bool{false, true} {
			body := map[string]any{
				"model": model, "messages": []any{map[string]any{"role": "user", "content": "Wake me at 7."}},
				"tools": tools, "tool_choice": "required", "seed": seed, "temperature": 1, "max_tokens": 300, "stream": stream,
			}
			direct := callsOf(t, postJSON(t, ctx, regional.h3Client(t), regional.base+"/v1/chat/completions", body))
			via := callsOf(t, postJSON(t, ctx, edge.h3Client(t), edge.base+"/v1/chat/completions", body))
			if len(direct) != 2 || !reflect.DeepEqual(via, direct) {
				t.Errorf("seed %d stream %v: through the edge %q, direct %q", seed, stream, via, direct)
			}
			if seed == 0 && stream {
				// The call and its result go back as history.
				call := map[string]any{"id": "call_1", "type": "function", "function": map[string]any{"name": direct[0], "arguments": direct[1]}}
				body["messages"] = append(body["messages"].([]any),
					map[string]any{"role": "assistant", "content": nil, "tool_calls": []any{call}},
					map[string]any{"role": "tool", "tool_call_id": "call_1", "content": "ok"})
				body["tool_choice"] = "none"
				direct := readStream(t, postJSON(t, ctx, regional.h3Client(t), regional.base+"/v1/chat/completions", body))
				via := readStream(t, postJSON(t, ctx, edge.h3Client(t), edge.base+"/v1/chat/completions", body))
				if via.text != direct.text || via.finish != direct.finish {
					t.Errorf("after the call: through the edge %q (%s), direct %q (%s)", via.text, via.finish, direct.text, direct.finish)
				}
			}
		}
	}
}

// callsOf is a chat answer's one tool call, whole or streamed: its
// function's name and its arguments, after checking the answer ended
// with finish reason tool_calls and the call's id is OpenAI's shape.
func callsOf(t *testing.T, resp *http.Response) []string {
	t.Helper()
	docs := answerDocs(t, resp)
	type call struct {
		ID       string `json:"id"`
		Function struct {
			Name      string `json:"name"`
			Arguments string `json:"arguments"`
		} `json:"function"`
	}
	var name, args, finish string
	calls := 0
	for _, d := range docs {
		var doc struct {
			Choices []struct {
				Message struct {
					ToolCalls []call `json:"tool_calls"`
				} `json:"message"`
				Delta struct {
					ToolCalls []call `json:"tool_calls"`
				} `json:"delta"`
				FinishReason string `json:"finish_reason"`
			} `json:"choices"`
		}
		if err := json.Unmarshal(d, &doc); err != nil {
			t.Fatalf("%s: %v", d, err)
		}
		for _, c := range doc.Choices {
			for _, tc := range append(c.Message.ToolCalls, c.Delta.ToolCalls...) {
				if tc.ID != "" {
					calls++
					if !strings.HasPrefix(tc.ID, "call_") {
						t.Errorf("call id %q", tc.ID)
					}
				}
				name += tc.Function.Name
				args += tc.Function.Arguments
			}
			if c.FinishReason != "" {
				finish = c.FinishReason
			}
		}
	}
	if calls != 1 || finish != "tool_calls" {
		t.Errorf("%d calls, finish %q; want one call and tool_calls", calls, finish)
	}
	return []string{name, args}
}

// answerDocs is an answer's JSON documents: the whole answer, or each
// event of a stream but [DONE].
func answerDocs(t *testing.T, resp *http.Response) [][]byte {
	t.Helper()
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: %s %v", resp.Request.URL.Path, body, err)
	}
	docs := [][]byte{body}
	if strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		docs = nil
		for line := range strings.Lines(string(body)) {
			if data, ok := strings.CutPrefix(strings.TrimSpace(line), "data: "); ok && data != "[DONE]" {
				docs = append(docs, []byte(data))
			}
		}
	}
	return docs
}

// TestUpstreamEmbeddingsAreTheRegionalTiers: the regional tier's encoder
// (its /v1/models marks it "task": "embed") serves embeddings through the
// edge: the vectors and usage the tier gives its own clients, as floats
// and in base64, with dimensions; and the edge refuses a completion for it
// as it would its own encoder's.
func TestUpstreamEmbeddingsAreTheRegionalTiers(t *testing.T) {
	// An encoder of a name only the regional tier serves: the edge's own
	// demo repository has an encoder too.
	const model = "regional-encoder"
	dir := t.TempDir()
	if out, err := exec.Command(buildBinary(t), "genmodel", "--encoder", "--out", dir).CombinedOutput(); err != nil {
		t.Fatalf("genmodel: %v\n%s", err, out)
	}
	regional := startServer(t, "--config", writeServeConfig(t, map[string]any{"models": []map[string]any{{"name": model, "dir": dir}}}))
	edge := startServer(t, "--config", writeServeConfig(t, map[string]any{"upstreams": []any{upstreamEntry(t, regional, "h3")}}))
	waitFor(t, "the edge to list the regional encoder", func() bool { return listsModel(t, edge, model) })
	ctx := t.Context()
	embed := func(s *server, body map[string]any) []byte {
		t.Helper()
		resp := postJSON(t, ctx, s.h3Client(t), s.base+"/v1/embeddings", body)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %d %s %v", s.base, resp.StatusCode, b, err)
		}
		var a map[string]any
		if err := json.Unmarshal(b, &a); err != nil {
			t.Fatal(err)
		}
		delete(a, "id") // the rest is the answer
		out, _ := json.Marshal(a)
		return out
	}
	for _, body := range []map[string]any{
		{"model": model, "input": []string{"the edge", "and the tier"}, "encoding_format": "float"},
		{"model": model, "input": "one text", "encoding_format": "base64", "dimensions": 16},
		{"model": model, "input": [][]int{{5, 6, 7}, {8}}},
	} {
		direct, via := embed(regional, body), embed(edge, body)
		if string(via) != string(direct) {
			t.Errorf("%v: through the edge\n%.300s\ndirect\n%.300s", body, via, direct)
		}
	}
	resp := postJSON(t, ctx, edge.h3Client(t), edge.base+"/v1/chat/completions", map[string]any{"model": model, "messages": []any{map[string]any{"role": "user", "content": "hi"}}})
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("a completion for the regional encoder through the edge: %d, want 400", resp.StatusCode)
	}
}
