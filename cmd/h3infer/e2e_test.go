package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go/http3"

	"h3infer/certs"
	"h3infer/engine"
	"h3infer/infer"
	"h3infer/ort"
	"h3infer/tlsbind"
)

// The end-to-end tests build the real binary once and start it as users do.
var binary struct {
	once sync.Once
	path string
	err  error
}

func buildBinary(t testing.TB) string {
	t.Helper()
	binary.once.Do(func() {
		dir, err := os.MkdirTemp("", "h3infer-e2e-bin")
		if err != nil {
			binary.err = err
			return
		}
		binary.path = filepath.Join(dir, "h3infer")
		out, err := exec.Command("go", "build", "-o", binary.path, ".").CombinedOutput()
		if err != nil {
			binary.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binary.err != nil {
		t.Fatal(binary.err)
	}
	return binary.path
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binary.path != "" {
		os.RemoveAll(filepath.Dir(binary.path))
	}
	os.Exit(code)
}

func ortLib(t testing.TB) string {
	t.Helper()
	lib := os.Getenv("ONNXRUNTIME_LIB")
	if lib == "" {
		t.Fatal("ONNXRUNTIME_LIB is not set: run the tests through `make test`, which fetches ONNX Runtime and sets it")
	}
	return lib
}

// server is one running `h3infer serve`.
type server struct {
	cmd      *exec.Cmd
	base     string // https://127.0.0.1:PORT
	admin    string // http://127.0.0.1:PORT
	stateDir string
	caFile   string
	stdout   *lockedBuffer // what serve printed, line by line
	stderr   *lockedBuffer
	exited   chan struct{}
	exitErr  error
}

var (
	urlLine   = regexp.MustCompile(`URL \(HTTP/3 on UDP, HTTP/1\.1\+2 on TCP\): (https://\S+)/`)
	adminLine = regexp.MustCompile(`Admin \(healthz, readyz, metrics\):\s+(http://\S+)/`)
)

// startServer runs `h3infer serve` on free loopback ports and waits until it
// prints that it is ready. The test's cleanup stops it with SIGTERM, checks
// that it exits 0, and that its worker processes are gone.
func startServer(t testing.TB, extra ...string) *server {
	t.Helper()
	bin := buildBinary(t)
	state := t.TempDir()
	args := append([]string{"serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", state, "--workers", "2"}, extra...)
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "ONNXRUNTIME_LIB="+ortLib(t))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	s := &server{cmd: cmd, stateDir: state, caFile: filepath.Join(state, "certs", certs.CAFile), stdout: new(lockedBuffer), stderr: new(lockedBuffer), exited: make(chan struct{})}
	cmd.Stderr = s.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			s.stdout.Write(append(sc.Bytes(), '\n'))
			lines <- sc.Text()
		}
	}()
	go func() {
		defer close(s.exited)
		s.exitErr = cmd.Wait()
	}()
	t.Cleanup(func() {
		var workers []int
		select {
		case <-s.exited:
		default:
			workers = childPIDs(cmd.Process.Pid)
			cmd.Process.Signal(syscall.SIGTERM)
		}
		select {
		case <-s.exited:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-s.exited
			t.Errorf("serve did not exit within 20s of SIGTERM\n%s", s.stderr)
		}
		if s.exitErr != nil {
			t.Errorf("serve exited with %v after SIGTERM; want status 0\n%s", s.exitErr, s.stderr)
		}
		for _, pid := range workers {
			if processAlive(pid) {
				t.Errorf("worker process %d outlived serve", pid)
			}
		}
	})
	deadline := time.After(60 * time.Second)
	for s.base == "" || s.admin == "" {
		select {
		case l, ok := <-lines:
			if !ok {
				<-s.exited
				t.Fatalf("serve exited before it was ready: %v\n%s", s.exitErr, s.stderr)
			}
			if m := urlLine.FindStringSubmatch(l); m != nil {
				s.base = m[1]
			}
			if m := adminLine.FindStringSubmatch(l); m != nil {
				s.admin = m[1]
			}
		case <-deadline:
			t.Fatalf("serve not ready within 60s\n%s", s.stderr)
		}
	}
	// Keep reading stdout so the server never blocks on a full pipe.
	go func() {
		for range lines {
		}
	}()
	return s
}

// lockedBuffer collects a child's stderr while the test may print it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// childPIDs lists the processes whose parent is pid.
func childPIDs(pid int) []int {
	var kids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// Fields after the parenthesised command: state ppid ...
		rest := string(b[bytes.LastIndexByte(b, ')')+2:])
		f := strings.Fields(rest)
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			kids = append(kids, n)
		}
	}
	return kids
}

func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	rest := string(b[bytes.LastIndexByte(b, ')')+2:])
	return !strings.HasPrefix(rest, "Z")
}

func (s *server) h3Client(t testing.TB) *http.Client {
	t.Helper()
	pool, err := certs.LoadPool(s.caFile)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http3.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	t.Cleanup(func() { tr.Close() })
	return &http.Client{Transport: s.withBearer(t, tr), Timeout: 60 * time.Second}
}

func (s *server) h2Client(t *testing.T) *http.Client {
	t.Helper()
	pool, err := certs.LoadPool(s.caFile)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: s.withBearer(t, tr), Timeout: 60 * time.Second}
}

// sseChunk is the part of an OpenAI chunk the tests read.
type sseChunk struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
	Choices []struct {
		Index int `json:"index"`
		Delta struct {
			Role    string `json:"role"`
			Content string `json:"content"`
		} `json:"delta"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
		TotalTokens      int `json:"total_tokens"`
	} `json:"usage"`
}

type streamResult struct {
	resp   *http.Response
	chunks []sseChunk
	text   string
	done   bool
	finish string
}

func postJSON(t *testing.T, ctx context.Context, c *http.Client, url string, body any) *http.Response {
	t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	return resp
}

func readStream(t *testing.T, resp *http.Response) streamResult {
	t.Helper()
	defer resp.Body.Close()
	r := streamResult{resp: resp}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("status %s: %s", resp.Status, b)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		t.Errorf("Content-Type = %q, want text/event-stream", ct)
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			t.Errorf("line %q is not an SSE data line", line)
			continue
		}
		if r.done {
			t.Errorf("event after [DONE]: %q", line)
		}
		if data == "[DONE]" {
			r.done = true
			continue
		}
		var c sseChunk
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			t.Fatalf("event %q: %v", data, err)
		}
		r.chunks = append(r.chunks, c)
		for _, ch := range c.Choices {
			r.text += ch.Delta.Content
			if ch.FinishReason != nil {
				r.finish = *ch.FinishReason
			}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("reading stream: %v", err)
	}
	return r
}

// inProcess runs the same model file the server serves directly in the test
// process, without ring or worker.
func inProcess(t *testing.T, s *server, sub *infer.Request) (string, infer.Done) {
	t.Helper()
	if err := ort.InitRuntime(ortLib(t)); err != nil {
		t.Fatal(err)
	}
	m, err := ort.LoadModel(filepath.Join(s.stateDir, "models", "demo", "1"), ort.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	text, done, err := engine.Generate(context.Background(), m, sub)
	if err != nil {
		t.Fatal(err)
	}
	return text, done
}

const testPrompt = "The gateway"

// chatBody asks for greedy decoding: OpenAI's default temperature is 1.
func chatBody(maxTokens int, stream bool) map[string]any {
	b := map[string]any{
		"model":       "demo",
		"temperature": 0,
		"messages":    []map[string]string{{"role": "user", "content": testPrompt}},
		"max_tokens":  maxTokens,
		"stream":      stream,
	}
	if stream {
		b["stream_options"] = map[string]any{"include_usage": true}
	}
	return b
}

// longStreamBody asks for a streamed completion that runs its whole 1000
// tokens, for tests that cancel or stall a stream midway and so need it
// still running then. Without ignore_eos the demo model, sampled at the
// default temperature, draws its end token within the first 40 tokens in
// about 2% of requests, and the stream ends before the test acts.
func longStreamBody() map[string]any {
	return map[string]any{"model": "demo", "prompt": testPrompt, "max_tokens": 1000, "stream": true, "ignore_eos": true}
}

func TestEndToEndStreamingChat(t *testing.T) {
	s := startServer(t)
	const maxTokens = 48
	want, wantDone := inProcess(t, s, &infer.Request{
		Model:     "demo",
		Messages:  []infer.ChatMessage{{Role: "user", Content: testPrompt}},
		MaxTokens: maxTokens,
	})
	if strings.TrimSpace(want) == "" {
		t.Fatalf("the model produced no text in process; the comparison would prove nothing")
	}

	for _, proto := range []struct {
		name   string
		client *http.Client
		major  int
	}{
		{"h3", s.h3Client(t), 3},
		{"h2", s.h2Client(t), 2},
	} {
		t.Run(proto.name, func(t *testing.T) {
			resp := postJSON(t, context.Background(), proto.client, s.base+"/v1/chat/completions", chatBody(maxTokens, true))
			r := readStream(t, resp)
			if resp.ProtoMajor != proto.major {
				t.Errorf("protocol %s, want HTTP/%d", resp.Proto, proto.major)
			}
			if proto.major == 2 {
				_, port, _ := strings.Cut(strings.TrimPrefix(s.base, "https://"), ":")
				if alt := resp.Header.Get("Alt-Svc"); !strings.Contains(alt, `h3=":`+port+`"`) {
					t.Errorf("Alt-Svc = %q, want h3 on port %s", alt, port)
				}
			}
			if !r.done {
				t.Errorf("stream did not end with data: [DONE]")
			}
			if r.text != want {
				t.Errorf("streamed text differs from the model run in process:\n got %q\nwant %q", r.text, want)
			}
			if r.finish != wantDone.FinishReason {
				t.Errorf("finish_reason = %q, want %q", r.finish, wantDone.FinishReason)
			}
			if len(r.chunks) < 3 {
				t.Fatalf("got %d chunks; tokens should arrive as separate events", len(r.chunks))
			}
			first := r.chunks[0]
			if first.Object != "chat.completion.chunk" || !strings.HasPrefix(first.ID, "chatcmpl-") || first.Model != "demo" || first.Created == 0 {
				t.Errorf("first chunk = %+v; want OpenAI chunk fields", first)
			}
			if len(first.Choices) == 0 || first.Choices[0].Delta.Role != "assistant" {
				t.Errorf("first chunk should carry delta.role=assistant: %+v", first)
			}
			last := r.chunks[len(r.chunks)-1]
			if last.Usage == nil || len(last.Choices) != 0 {
				t.Fatalf("last chunk should be the usage chunk with no choices: %+v", last)
			}
			if got := last.Usage.CompletionTokens; got != int(wantDone.CompletionTokens) || got != maxTokens {
				t.Errorf("usage.completion_tokens = %d, want %d (max_tokens %d)", got, wantDone.CompletionTokens, maxTokens)
			}
			if last.Usage.PromptTokens != int(wantDone.PromptTokens) || last.Usage.TotalTokens != last.Usage.PromptTokens+last.Usage.CompletionTokens {
				t.Errorf("usage = %+v, want prompt_tokens %d and a consistent total", *last.Usage, wantDone.PromptTokens)
			}
		})
	}
}

// The command README.md and `make run` print must work as printed.
func TestChatCommand(t *testing.T) {
	s := startServer(t)
	want, _ := inProcess(t, s, &infer.Request{
		Model: "demo", Messages: []infer.ChatMessage{{Role: "user", Content: testPrompt}}, MaxTokens: 64,
	})
	// chat finds the CA and the dev token in the state dir by itself.
	cmd := exec.Command(buildBinary(t), "chat", "--url", s.base, "--state-dir", s.stateDir, testPrompt)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("h3infer chat: %v\n%s", err, stderr.String())
	}
	if got := strings.TrimSuffix(stdout.String(), "\n"); got != want {
		t.Errorf("chat printed %q, want %q", got, want)
	}
	if !strings.Contains(stderr.String(), "HTTP/3") || !strings.Contains(stderr.String(), "64 tokens") {
		t.Errorf("chat summary %q should name HTTP/3 and 64 tokens", stderr.String())
	}
	t.Logf("h3infer chat: %s", strings.TrimSpace(stderr.String()))
}

func TestEndToEndNonStreamingAndSeed(t *testing.T) {
	s := startServer(t)
	c := s.h3Client(t)
	body := chatBody(24, false)
	body["temperature"] = 0.9
	body["seed"] = 7
	var texts []string
	for i := 0; i < 2; i++ {
		resp := postJSON(t, context.Background(), c, s.base+"/v1/chat/completions", body)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %s: %s", resp.Status, b)
		}
		var out struct {
			Object  string `json:"object"`
			Choices []struct {
				Message struct {
					Role    string `json:"role"`
					Content string `json:"content"`
				} `json:"message"`
				FinishReason string `json:"finish_reason"`
			} `json:"choices"`
			Usage struct {
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
		}
		if err := json.Unmarshal(b, &out); err != nil {
			t.Fatalf("%v: %s", err, b)
		}
		if out.Object != "chat.completion" || len(out.Choices) != 1 || out.Choices[0].Message.Role != "assistant" {
			t.Fatalf("response = %s; want a chat.completion with one assistant choice", b)
		}
		if out.Usage.CompletionTokens != 24 || out.Choices[0].FinishReason != "length" {
			t.Errorf("usage.completion_tokens = %d, finish_reason %q; want 24, length", out.Usage.CompletionTokens, out.Choices[0].FinishReason)
		}
		texts = append(texts, out.Choices[0].Message.Content)
	}
	if texts[0] != texts[1] {
		t.Errorf("same seed gave different text:\n%q\n%q", texts[0], texts[1])
	}
	want, _ := inProcess(t, s, &infer.Request{
		Model: "demo", Messages: []infer.ChatMessage{{Role: "user", Content: testPrompt}},
		MaxTokens: 24, Temperature: 0.9, Seed: 7, HasSeed: true,
	})
	if texts[0] != want {
		t.Errorf("seeded text over the ring differs from the model in process:\n got %q\nwant %q", texts[0], want)
	}
}

func TestEndToEndErrors(t *testing.T) {
	s := startServer(t)
	c := s.h3Client(t)
	long := strings.Repeat("edge ", 4000)
	for _, tc := range []struct {
		name   string
		body   map[string]any
		status int
		code   string
	}{
		{"unknown model", map[string]any{"model": "nope", "messages": []map[string]string{{"role": "user", "content": "hi"}}}, 404, "model_not_found"},
		{"prompt longer than context", map[string]any{"model": "demo", "prompt": long}, 400, "context_length_exceeded"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := "/v1/chat/completions"
			if _, ok := tc.body["prompt"]; ok {
				path = "/v1/completions"
			}
			resp := postJSON(t, context.Background(), c, s.base+path, tc.body)
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, b)
			}
			var e struct {
				Error struct {
					Message string `json:"message"`
					Type    string `json:"type"`
					Code    string `json:"code"`
				} `json:"error"`
			}
			if err := json.Unmarshal(b, &e); err != nil || e.Error.Message == "" || e.Error.Code != tc.code {
				t.Errorf("body %s; want an OpenAI error with code %q", b, tc.code)
			}
		})
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get(s.admin + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s = %d, want 200 once workers are ready", path, resp.StatusCode)
		}
	}
}

// metric sums the samples of one metric family in Prometheus text format.
func metric(t testing.TB, s *server, name string) float64 {
	t.Helper()
	v, err := metricValue(s, name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// metricValue is metric for a goroutine other than the test's: the sum of
// the series of name on /metrics, or why it could not be read.
func metricValue(s *server, name string) (float64, error) {
	resp, err := http.Get(s.admin + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metric line %q: %w", line, err)
		}
		sum += v
	}
	return sum, sc.Err()
}

func TestEndToEndDisconnectCancelsWorker(t *testing.T) {
	s := startServer(t)
	c := s.h3Client(t)
	before := metric(t, s, "h3infer_worker_sequences_cancelled_total")
	genBefore := metric(t, s, "h3infer_worker_tokens_generated_total")

	// Ask for as much as the context allows, read a little, then hang up.
	ctx, cancel := context.WithCancel(context.Background())
	resp := postJSON(t, ctx, c, s.base+"/v1/completions", longStreamBody())
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %s", resp.Status)
	}
	br := bufio.NewReader(resp.Body)
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	cancel()
	resp.Body.Close()

	deadline := time.Now().Add(10 * time.Second)
	for metric(t, s, "h3infer_worker_sequences_cancelled_total") <= before {
		if time.Now().After(deadline) {
			t.Fatalf("h3infer_worker_sequences_cancelled_total stayed at %v after the client went away", before)
		}
		time.Sleep(20 * time.Millisecond)
	}
	generated := metric(t, s, "h3infer_worker_tokens_generated_total") - genBefore
	if generated >= 1000 {
		t.Errorf("the worker generated %v tokens for a request cancelled after its first event", generated)
	}
	t.Logf("tokens generated before the cancel reached the worker: %v", generated)
}

func TestCertsAndGenmodelCommands(t *testing.T) {
	bin := buildBinary(t)
	state := t.TempDir()
	out, err := exec.Command(bin, "certs", "init", "--state-dir", state).CombinedOutput()
	if err != nil {
		t.Fatalf("certs init: %v\n%s", err, out)
	}
	pin, err := os.ReadFile(filepath.Join(state, "certs", certs.SPKIFile))
	if err != nil || !strings.Contains(string(out), strings.TrimSpace(string(pin))) {
		t.Errorf("certs init should print the SPKI pin from spki.txt (%v):\n%s", err, out)
	}
	again, err := exec.Command(bin, "certs", "init", "--state-dir", state).CombinedOutput()
	if err != nil || !strings.Contains(string(again), "kept the existing") {
		t.Errorf("second certs init should keep what exists (%v):\n%s", err, again)
	}
	dir := t.TempDir()
	if out, err := exec.Command(bin, "genmodel", "--out", dir).CombinedOutput(); err != nil {
		t.Fatalf("genmodel: %v\n%s", err, out)
	}
	for _, f := range []string{"model.onnx", "tokenizer.json", "model.json"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("genmodel did not write %s: %v", f, err)
		}
	}
	if out, err := exec.Command(bin, "serve", "--workers", "100", "--listen", "nonsense").CombinedOutput(); err == nil || !strings.Contains(string(out), "workers.count") || !strings.Contains(string(out), "listen:") {
		t.Errorf("serve with a bad listen address and 100 workers should fail naming both keys; got %v:\n%s", err, out)
	}
}

// bearer is the bearer part of the dev token serve wrote into its state dir.
func (s *server) bearer(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(s.stateDir, "tokens", "dev.token"))
	if err != nil {
		t.Fatal(err)
	}
	bearer, _, err := tlsbind.SplitCredential(string(b))
	if err != nil {
		t.Fatal(err)
	}
	return bearer
}

// TestServePrintsNoSecret: serve used to print the whole dev credential,
// secret part included, where terminal scrollback and CI logs keep it.
// Now it prints the bearer part and the file's path only.
func TestServePrintsNoSecret(t *testing.T) {
	s := startServer(t)
	b, err := os.ReadFile(devTokenFile(s.stateDir))
	if err != nil {
		t.Fatal(err)
	}
	cred := strings.TrimSpace(string(b))
	bearer, _, err := tlsbind.SplitCredential(cred)
	if err != nil {
		t.Fatal(err)
	}
	secret := cred[len(bearer)+1:]
	// The next steps go out in one write; their last line names chromium.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(s.stdout.String(), "--user-data-dir") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	out := s.stdout.String()
	if !strings.Contains(out, "Bearer "+bearer) || !strings.Contains(out, devTokenFile(s.stateDir)) {
		t.Fatalf("stdout lacks the bearer part or the credential's path:\n%s", out)
	}
	if strings.Contains(out, secret) {
		t.Errorf("stdout shows the credential's secret part:\n%s", out)
	}
	// What it printed is enough for curl: the bearer part alone is accepted.
	req, _ := http.NewRequest(http.MethodGet, s.base+"/v1/models", nil)
	req.Header.Set("Authorization", "Bearer "+bearer)
	pool, err := certs.LoadPool(s.caFile)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /v1/models with the printed bearer: %s, want 200", resp.Status)
	}
}

// withBearer presents the dev token on every request.
func (s *server) withBearer(t testing.TB, next http.RoundTripper) http.RoundTripper {
	t.Helper()
	return bearerTransport{bearer: s.bearer(t), next: next}
}

type bearerTransport struct {
	bearer string
	next   http.RoundTripper
}

func (b bearerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.bearer)
	return b.next.RoundTrip(r)
}

// gpuConfig writes a config serving a fresh demo model with provider.
func gpuConfig(t *testing.T, provider string) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command(buildBinary(t), "genmodel", "--out", dir).CombinedOutput(); err != nil {
		t.Fatalf("genmodel: %v\n%s", err, out)
	}
	path := filepath.Join(t.TempDir(), "config.json")
	cfg := fmt.Sprintf(`{"models": [{"name": "demo", "dir": %q, "provider": %q}]}`, dir, provider)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// On a host without CUDA, provider cuda stops serve before it listens,
// naming the library that is missing; auto serves on the CPU.
func TestServeGPUProviderWithoutGPU(t *testing.T) {
	// serve must fail at start; the bound keeps a regression from hanging.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, buildBinary(t), "serve", "--config", gpuConfig(t, "cuda"), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", t.TempDir())
	cmd.Env = append(os.Environ(), "ONNXRUNTIME_LIB="+ortLib(t))
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "libonnxruntime_providers_shared.so") || !strings.Contains(string(out), "models[0] (demo)") {
		t.Errorf("serve with provider cuda and no provider libraries: %v, want a failure naming the library and the model:\n%s", err, out)
	}
	if strings.Contains(string(out), "listening") {
		t.Errorf("serve listened before failing:\n%s", out)
	}

	s := startServer(t, "--config", gpuConfig(t, "auto"))
	resp := postJSON(t, context.Background(), s.h3Client(t), s.base+"/v1/chat/completions", chatBody(8, false))
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), `"completion_tokens":8`) {
		t.Errorf("auto on a host without CUDA: %s %s", resp.Status, b)
	}
	if !strings.Contains(s.stderr.String(), "model runs on the cpu") {
		t.Errorf("no fallback warning in the log:\n%s", s.stderr)
	}
}

// TestChatResumesIn0RTT runs `h3infer chat` twice with one state dir: the
// first run does a full handshake and keeps the ticket it receives in the
// session cache file; the second, a new process, resumes from that file
// and sends its request in 0-RTT, which the gateway serves early.
func TestChatResumesIn0RTT(t *testing.T) {
	// A short freshness window: the in-memory strike register refuses
	// 0-RTT for two windows after start.
	cfg := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(cfg, []byte(`{"zero_rtt": {"window": "1s"}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, "--config", cfg)
	started := time.Now()
	chat := func() string {
		t.Helper()
		cmd := exec.Command(buildBinary(t), "chat", "--url", s.base, "--state-dir", s.stateDir, "--max-tokens", "8", testPrompt)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("h3infer chat: %v\n%s", err, stderr.String())
		}
		t.Logf("h3infer chat: %s", strings.TrimSpace(stderr.String()))
		return stderr.String()
	}
	// Tickets issued during the warm-up window carry no 0-RTT, so even the
	// first run waits it out.
	if d := time.Until(started.Add(2500 * time.Millisecond)); d > 0 {
		time.Sleep(d)
	}
	if first := chat(); strings.Contains(first, "0-RTT") {
		t.Errorf("first run, without a ticket, says 0-RTT: %q", first)
	}
	file := filepath.Join(s.stateDir, "client-sessions.json")
	fi, err := os.Stat(file)
	if err != nil {
		t.Fatalf("first run left no session cache: %v", err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 {
		t.Errorf("session cache mode %v, want 0600", mode)
	}
	// Later runs resume from the file and send their request in 0-RTT. On
	// a loaded machine a run may exit before the server's next ticket
	// arrives, leaving only a spent one for the run after it; so of four
	// runs at least one must be early, and the gateway must have served
	// exactly as many early as the summaries claim.
	before := earlyAccepted(t, s)
	early := 0
	for range 4 {
		if strings.Contains(chat(), "HTTP/3.0 (0-RTT)") {
			early++
		}
	}
	if early == 0 {
		t.Errorf("none of four runs after the first resumed in 0-RTT")
	}
	if got := earlyAccepted(t, s); got != before+float64(early) {
		t.Errorf("early_data_requests_total{outcome=accepted} went from %v to %v; %d runs said 0-RTT", before, got, early)
	}
	t.Logf("%d of 4 later runs were served in 0-RTT", early)
}

// earlyAccepted reads h3infer_early_data_requests_total{outcome="accepted"}.
func earlyAccepted(t *testing.T, s *server) float64 {
	t.Helper()
	for _, l := range strings.Split(scrape(t, s), "\n") {
		if strings.HasPrefix(l, "h3infer_early_data_requests_total{") && strings.Contains(l, `outcome="accepted"`) {
			f := strings.Fields(l)
			v, err := strconv.ParseFloat(f[len(f)-1], 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", l, err)
			}
			return v
		}
	}
	return 0
}
