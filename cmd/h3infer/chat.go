package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"h3infer/certs"
	"h3infer/client"
)

func runChat(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, log *slog.Logger) error {
	fs := flag.NewFlagSet("chat", flag.ContinueOnError)
	base := fs.String("url", "https://127.0.0.1:8443", "gateway URL")
	caFile := fs.String("ca", "", "CA certificate that signed the gateway's certificate (default STATE_DIR/certs/ca.pem)")
	stateDir := fs.String("state-dir", ".h3infer", "state directory of a local serve: its CA and dev token")
	token := fs.String("token", "", "credential from `h3infer token issue` (default: $H3INFER_TOKEN, else STATE_DIR/tokens/dev.token)")
	model := fs.String("model", "demo", "model name")
	maxTokens := fs.Int("max-tokens", 64, "tokens to generate at most")
	temperature := fs.Float64("temperature", 0, "sampling temperature (0: greedy)")
	seed := fs.Int64("seed", -1, "sampling seed (-1: none)")
	sessionFile := fs.String("session-cache", "", "file keeping TLS session tickets between runs, so a run resumes and sends in 0-RTT (default STATE_DIR/"+chatSessionFile+"; \"off\": none)")
	if err := parseFlags(fs, args, 1); err != nil {
		return err
	}
	endpoint, err := chatEndpoint(*base)
	if err != nil {
		return usageError{err}
	}
	if *caFile == "" {
		*caFile = filepath.Join(*stateDir, "certs", certs.CAFile)
	}
	pool, err := certs.LoadPool(*caFile)
	if err != nil {
		return err
	}
	cred, err := chatCredential(*token, *stateDir)
	if err != nil {
		return err
	}
	tlsConf := &tls.Config{RootCAs: pool}
	if *sessionFile == "" {
		*sessionFile = filepath.Join(*stateDir, chatSessionFile)
	}
	var sessions *client.SessionCache
	if *sessionFile != "off" {
		sessions = client.OpenSessionCache(*sessionFile, 0, log)
		tlsConf.ClientSessionCache = sessions
	}
	cl, err := client.New(client.Config{TLS: tlsConf, Credential: cred})
	if err != nil {
		return err
	}
	defer cl.Close()
	if sessions != nil {
		// Any ticket this run receives is newer than the one it started
		// with, which a 0-RTT request has spent. The server may send it
		// after the last token, so wait for it, briefly, before exiting.
		gen := sessions.Generation()
		defer func() {
			if !sessions.WaitNewer(ctx, gen, chatTicketWait) {
				log.Debug("no new session ticket before exit; the next run does a full handshake or resumes without 0-RTT")
			}
		}()
	}

	// ask sends the conversation so far and streams the answer to stdout.
	ask := func(messages []chatMessage) (string, error) {
		req := chatRequest{
			Model:         *model,
			Messages:      messages,
			MaxTokens:     *maxTokens,
			Temperature:   *temperature,
			Stream:        true,
			StreamOptions: &streamOptions{IncludeUsage: true},
		}
		if *seed >= 0 {
			req.Seed = seed
		}
		var answer strings.Builder
		st, err := streamChat(ctx, cl, endpoint, &req, io.MultiWriter(stdout, &answer))
		if err != nil {
			return "", err
		}
		fmt.Fprintf(stdout, "\n")
		proto := st.proto
		if st.early {
			proto += " (0-RTT)"
		}
		fmt.Fprintf(stderr, "[%s · time to first token %s · %d tokens · %.0f tokens/s · finish_reason %s · prompt %d tokens]\n",
			proto, st.ttft.Round(10*time.Microsecond), st.tokens, st.tokensPerSecond(), st.finishReason, st.promptTokens)
		return answer.String(), nil
	}

	if prompt := fs.Arg(0); prompt != "" {
		_, err := ask([]chatMessage{{Role: "user", Content: prompt}})
		return err
	}
	return chatInteractive(ctx, stdin, stderr, ask)
}

// chatSessionFile is where chat keeps session tickets, in the state dir:
// next to the CA and credential it already reads there, one per user.
const chatSessionFile = "client-sessions.json"

// chatTicketWait bounds how long chat waits, before it exits, for the
// session ticket the next run resumes with.
const chatTicketWait = 2 * time.Second

// chatInteractive holds a conversation: each line read is a user turn, sent
// with every turn before it over the same HTTP/3 connection. "/reset" starts
// over; end of input ends it.
func chatInteractive(ctx context.Context, stdin io.Reader, stderr io.Writer, ask func([]chatMessage) (string, error)) error {
	fmt.Fprintln(stderr, "h3infer chat: one message per line; /reset starts over; Ctrl-D ends.")
	var messages []chatMessage
	sc := bufio.NewScanner(stdin)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for {
		fmt.Fprint(stderr, "> ")
		if !sc.Scan() {
			fmt.Fprintln(stderr)
			return sc.Err()
		}
		line := strings.TrimSpace(sc.Text())
		switch line {
		case "":
			continue
		case "/reset":
			messages = nil
			fmt.Fprintln(stderr, "[conversation cleared]")
			continue
		}
		messages = append(messages, chatMessage{Role: "user", Content: line})
		answer, err := ask(messages)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			// One failed turn need not end the conversation; it is dropped
			// so the next turn is not sent after an unanswered one.
			messages = messages[:len(messages)-1]
			fmt.Fprintf(stderr, "error: %v\n", err)
			continue
		}
		messages = append(messages, chatMessage{Role: "assistant", Content: answer})
	}
}

// chatCredential picks the credential: the flag, then H3INFER_TOKEN, then
// the development token a local serve wrote.
func chatCredential(flagValue, stateDir string) (string, error) {
	if flagValue != "" {
		return flagValue, nil
	}
	if v := os.Getenv("H3INFER_TOKEN"); v != "" {
		return v, nil
	}
	b, err := os.ReadFile(devTokenFile(stateDir))
	if err != nil {
		return "", fmt.Errorf("no credential: pass --token, set H3INFER_TOKEN or run serve with --state-dir %s: %w", stateDir, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// chatEndpoint accepts a base URL or a full chat completions URL.
func chatEndpoint(base string) (string, error) {
	u, err := url.Parse(base)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return "", fmt.Errorf("--url: want https://host:port, got %q", base)
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = "/v1/chat/completions"
	}
	return u.String(), nil
}

type chatMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type chatRequest struct {
	Model         string         `json:"model"`
	Messages      []chatMessage  `json:"messages"`
	MaxTokens     int            `json:"max_tokens,omitempty"`
	Temperature   float64        `json:"temperature"`
	Seed          *int64         `json:"seed,omitempty"`
	Stream        bool           `json:"stream"`
	StreamOptions *streamOptions `json:"stream_options,omitempty"`
}

type chatChunk struct {
	Choices []struct {
		Delta struct {
			Content string `json:"content"`
		} `json:"delta"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	Error *apiError `json:"error"`
}

type apiError struct {
	Message string `json:"message"`
	Type    string `json:"type"`
	Code    any    `json:"code"`
}

// chatStats is what one streamed completion measured.
type chatStats struct {
	proto        string
	early        bool          // served in 0-RTT
	ttft         time.Duration // request sent to first content
	decode       time.Duration // first content to last content
	tokens       int
	promptTokens int // the whole conversation sent, as the model counts it
	finishReason string
}

// tokensPerSecond is the decode rate after the first token.
func (s chatStats) tokensPerSecond() float64 {
	if s.tokens < 2 || s.decode <= 0 {
		return 0
	}
	return float64(s.tokens-1) / s.decode.Seconds()
}

// streamChat posts a streaming chat request and copies content to out as it
// arrives.
func streamChat(ctx context.Context, cl *client.Client, endpoint string, cr *chatRequest, out io.Writer) (chatStats, error) {
	var st chatStats
	body, err := json.Marshal(cr)
	if err != nil {
		return st, err
	}
	start := time.Now()
	res, err := cl.Do(ctx, http.MethodPost, endpoint, http.Header{"Content-Type": {"application/json"}}, body)
	if err != nil {
		return st, fmt.Errorf("POST %s: %w", endpoint, err)
	}
	resp := res.Response
	defer resp.Body.Close()
	st.proto = resp.Proto
	st.early = res.Early
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error apiError `json:"error"`
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if json.Unmarshal(b, &e) == nil && e.Error.Message != "" {
			return st, fmt.Errorf("%s: %s", resp.Status, e.Error.Message)
		}
		return st, fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(b)))
	}

	var first, last time.Time
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			st.decode = last.Sub(first)
			return st, nil
		}
		var c chatChunk
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			return st, fmt.Errorf("bad event %q: %w", data, err)
		}
		if c.Error != nil {
			return st, fmt.Errorf("stream ended with an error: %s", c.Error.Message)
		}
		for _, ch := range c.Choices {
			if ch.Delta.Content != "" {
				now := time.Now()
				if first.IsZero() {
					first = now
					st.ttft = now.Sub(start)
				}
				last = now
				io.WriteString(out, ch.Delta.Content)
			}
			if ch.FinishReason != nil {
				st.finishReason = *ch.FinishReason
			}
		}
		if c.Usage != nil {
			st.tokens = c.Usage.CompletionTokens
			st.promptTokens = c.Usage.PromptTokens
		}
	}
	if err := sc.Err(); err != nil {
		return st, fmt.Errorf("reading stream: %w", err)
	}
	return st, errors.New("stream ended without [DONE]")
}
