package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"h3infer/certs"
)

// jsDir holds the JavaScript clients the tests drive and their locked
// dependencies, installed by `make test` with npm ci.
const jsDir = "testdata/js"

// runNode runs one of the scripts in jsDir with cfg as its JSON argument and
// returns what it printed on stdout.
func runNode(t *testing.T, script string, cfg any, env ...string) []byte {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatal("node is not installed; .ci/run installs it (Debian npm)")
	}
	if _, err := os.Stat(filepath.Join(jsDir, "node_modules", ".package-lock.json")); err != nil {
		t.Fatalf("%s/node_modules is missing: run the tests through `make test`, which runs npm ci there", jsDir)
	}
	arg, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, script, string(arg))
	cmd.Dir = jsDir
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("node %s: %v\n%s", script, err, stderr.String())
	}
	return stdout.Bytes()
}

// answer is the part of a completion the clients must reproduce.
type answer struct {
	text         string
	tokens       int
	finish       string
	promptTokens int
}

// greedyChat is what the API answers, not streamed, for a greedy chat
// request: the reference every client must reproduce.
func greedyChat(t *testing.T, s *server, messages []map[string]string, maxTokens int) answer {
	t.Helper()
	resp := postJSON(t, context.Background(), s.h3Client(t), s.base+"/v1/chat/completions", map[string]any{
		"model": "demo", "messages": messages, "max_tokens": maxTokens, "temperature": 0,
	})
	defer resp.Body.Close()
	var r struct {
		Choices []struct {
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage struct {
			PromptTokens     int `json:"prompt_tokens"`
			CompletionTokens int `json:"completion_tokens"`
		} `json:"usage"`
	}
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &r); err != nil || resp.StatusCode != http.StatusOK || len(r.Choices) != 1 {
		t.Fatalf("greedy reference request: status %s, %v: %s", resp.Status, err, b)
	}
	if strings.TrimSpace(r.Choices[0].Message.Content) == "" {
		t.Fatal("the reference answer is empty; comparing against it would prove nothing")
	}
	return answer{r.Choices[0].Message.Content, r.Usage.CompletionTokens, r.Choices[0].FinishReason, r.Usage.PromptTokens}
}

// pageRun is what the chat page recorded about one turn (chat.js).
type pageRun struct {
	Text     string  `json:"text"`
	Protocol string  `json:"protocol"`
	Tokens   int     `json:"tokens"`
	TTFT     float64 `json:"ttft"`
	Rate     float64 `json:"rate"`
	Finish   string  `json:"finish"`
	Error    string  `json:"error"`
	Reads    []struct {
		T     float64 `json:"t"`
		Bytes int     `json:"bytes"`
	} `json:"reads"`
}

// TestBrowserChatPage loads the chat page in headless Chromium over HTTP/3
// from the real server and holds two turns of a conversation through it.
func TestBrowserChatPage(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is not installed; .ci/run installs it (apt-get install chromium)")
	}
	s := startServer(t)
	spki, err := os.ReadFile(filepath.Join(s.stateDir, "certs", certs.SPKIFile))
	if err != nil {
		t.Fatal(err)
	}

	// A browser that first comes over TCP must learn about HTTP/3 from the
	// page's own response.
	resp, err := s.h2Client(t).Get(s.base + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	_, port, _ := strings.Cut(strings.TrimPrefix(s.base, "https://"), ":")
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Errorf("GET / over %s: %s, Content-Type %q; want the HTML page", resp.Proto, resp.Status, resp.Header.Get("Content-Type"))
	}
	if alt := resp.Header.Get("Alt-Svc"); !strings.Contains(alt, `h3=":`+port+`"`) {
		t.Errorf("GET / over %s: Alt-Svc %q, want h3 on port %s", resp.Proto, alt, port)
	}

	const maxTokens = 200 // more than the demo model's answer, which ends by itself
	turns := []string{testPrompt, "and then the workers", "over QUIC"}
	shot := filepath.Join(t.TempDir(), "chat.png")
	if p := os.Getenv("H3INFER_SCREENSHOT"); p != "" {
		// `make screenshot` refreshes the README's picture this way.
		shot, _ = filepath.Abs(p)
	}
	start := time.Now()
	out := runNode(t, "browser.mjs", map[string]any{
		"chromium": browser, "url": s.base, "spki": strings.TrimSpace(string(spki)),
		"turns": turns, "maxTokens": maxTokens, "screenshot": shot, "token": s.bearer(t),
	})
	t.Logf("browser session took %s", time.Since(start).Round(time.Millisecond))
	var got struct {
		PageErrors         []string `json:"pageErrors"`
		NavigationProtocol string   `json:"navigationProtocol"`
		Models             []string `json:"models"`
		Requests           []struct {
			Messages []map[string]string `json:"messages"`
		} `json:"requests"`
		Turns []struct {
			Run   pageRun `json:"run"`
			Shown string  `json:"shown"`
			Stats struct {
				Proto, TTFT, Rate string
			} `json:"stats"`
		} `json:"turns"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("browser.mjs printed %q: %v", out, err)
	}
	for _, e := range got.PageErrors {
		t.Errorf("page error: %s", e)
	}
	if got.NavigationProtocol != "h3" {
		t.Errorf("page loaded over %q, want h3", got.NavigationProtocol)
	}
	// The demo repository's encoder answers embeddings, not chat.
	if !slices.Equal(got.Models, []string{"demo"}) {
		t.Errorf("the page offers models %q, want only demo", got.Models)
	}
	if len(got.Turns) != len(turns) || len(got.Requests) != len(turns) {
		t.Fatalf("browser ran %d turns and sent %d requests, want %d", len(got.Turns), len(got.Requests), len(turns))
	}

	var conversation []map[string]string
	incremental := 0
	for i, turn := range got.Turns {
		run := turn.Run
		conversation = append(conversation, map[string]string{"role": "user", "content": turns[i]})
		if run.Error != "" {
			t.Fatalf("turn %d: the page reports %q", i, run.Error)
		}
		// The page keeps the conversation: each turn sends all before it.
		if sent := got.Requests[i].Messages; len(sent) != len(conversation) {
			t.Errorf("turn %d sent %d messages, want %d", i, len(sent), len(conversation))
		}
		want := greedyChat(t, s, conversation, maxTokens)
		conversation = append(conversation, map[string]string{"role": "assistant", "content": want.text})
		if run.Text != want.text || turn.Shown != want.text {
			t.Errorf("turn %d: page got %q and shows %q; the API answers %q", i, run.Text, turn.Shown, want.text)
		}
		if run.Protocol != "h3" || turn.Stats.Proto != "h3" {
			t.Errorf("turn %d: fetch went over %q (shown %q), want h3", i, run.Protocol, turn.Stats.Proto)
		}
		if run.Tokens != want.tokens || run.Finish != want.finish {
			t.Errorf("turn %d: %d tokens, finish %q; the API says %d, %q", i, run.Tokens, run.Finish, want.tokens, want.finish)
		}
		if run.TTFT <= 0 || turn.Stats.TTFT == "–" {
			t.Errorf("turn %d: TTFT %v ms (shown %q); want it measured and shown", i, run.TTFT, turn.Stats.TTFT)
		}
		reads := run.Reads
		if len(reads) >= 3 && reads[len(reads)-1].T > reads[0].T {
			incremental++
			// A rate needs tokens that arrived at different times.
			if run.Rate <= 0 || turn.Stats.Rate == "–" {
				t.Errorf("turn %d: %v tokens/s (shown %q); want it measured and shown", i, run.Rate, turn.Stats.Rate)
			}
		}
		t.Logf("turn %d over %s: %d reads in %.1f ms, first token %.1f ms, %.0f tokens/s", i, run.Protocol, len(reads), reads[len(reads)-1].T-reads[0].T, run.TTFT, run.Rate)
	}
	// Tokens must reach the page as they are made, not in one piece at the
	// end: several reads, at different times. The demo model writes its
	// whole answer in about a tenth of a second, and on a loaded machine a
	// renderer (or gateway) descheduled that long sees it in one read, so
	// most turns, not all, must show it; a gateway that buffered responses
	// would fail every turn.
	if incremental*2 <= len(turns) {
		t.Errorf("only %d of %d turns reached the page in several reads spread over time", incremental, len(turns))
	}
	if fi, err := os.Stat(shot); err != nil || fi.Size() == 0 {
		t.Errorf("no screenshot at %s: %v", shot, err)
	} else {
		t.Logf("screenshot: %s", shot)
	}
}

// TestChatInteractive holds a two-turn conversation with `h3infer chat` on
// stdin: the second turn must be answered as the continuation of the first.
func TestChatInteractive(t *testing.T) {
	s := startServer(t)
	const maxTokens = 32
	turns := []string{testPrompt, "and then the workers"}
	var conversation []map[string]string
	var want strings.Builder
	var wantPrompt []string
	for _, turn := range turns {
		conversation = append(conversation, map[string]string{"role": "user", "content": turn})
		a := greedyChat(t, s, conversation, maxTokens)
		conversation = append(conversation, map[string]string{"role": "assistant", "content": a.text})
		want.WriteString(a.text + "\n")
		wantPrompt = append(wantPrompt, strconv.Itoa(a.promptTokens))
	}

	cmd := exec.Command(buildBinary(t), "chat", "--url", s.base, "--state-dir", s.stateDir, "--max-tokens", strconv.Itoa(maxTokens))
	cmd.Stdin = strings.NewReader(strings.Join(turns, "\n") + "\n")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("h3infer chat: %v\n%s", err, stderr.String())
	}
	if stdout.String() != want.String() {
		t.Errorf("chat printed %q, want %q", stdout.String(), want.String())
	}
	// The prompt each turn sent, as the model counted it, shows the
	// conversation was kept: the demo model's answers alone would not.
	var gotPrompt []string
	for _, m := range regexp.MustCompile(`\[HTTP/3\.0 · time to first token \S+ · \d+ tokens · \d+ tokens/s · finish_reason \w+ · prompt (\d+) tokens\]`).FindAllStringSubmatch(stderr.String(), -1) {
		gotPrompt = append(gotPrompt, m[1])
	}
	if strings.Join(gotPrompt, ",") != strings.Join(wantPrompt, ",") {
		t.Errorf("turn summaries give prompt sizes %v, want %v (the whole conversation each turn):\n%s", gotPrompt, wantPrompt, stderr.String())
	}
	t.Logf("h3infer chat:\n%s", stderr.String())
}
