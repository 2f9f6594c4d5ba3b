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
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"h3infer/certs"
	"h3infer/client"
)

func runChat(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("chat", flag.ContinueOnError)
	base := fs.String("url", "https://127.0.0.1:8443", "gateway URL")
	caFile := fs.String("ca", "", "CA certificate that signed the gateway's certificate (default STATE_DIR/certs/ca.pem)")
	stateDir := fs.String("state-dir", ".h3infer", "state directory of a local serve: its CA and dev token")
	token := fs.String("token", "", "credential from `h3infer token issue` (default: $H3INFER_TOKEN, else STATE_DIR/tokens/dev.token)")
	model := fs.String("model", "demo", "model name")
	maxTokens := fs.Int("max-tokens", 64, "tokens to generate at most")
	temperature := fs.Float64("temperature", 0, "sampling temperature (0: greedy)")
	seed := fs.Int64("seed", -1, "sampling seed (-1: none)")
	if err := parseFlags(fs, args, 1); err != nil {
		return err
	}
	prompt := fs.Arg(0)
	if prompt == "" {
		return usagef("a prompt is required: h3infer chat [flags] \"prompt\"")
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
	cl, err := client.New(client.Config{TLS: &tls.Config{RootCAs: pool}, Credential: cred})
	if err != nil {
		return err
	}
	defer cl.Close()

	req := chatRequest{
		Model:         *model,
		Messages:      []chatMessage{{Role: "user", Content: prompt}},
		MaxTokens:     *maxTokens,
		Temperature:   *temperature,
		Stream:        true,
		StreamOptions: &streamOptions{IncludeUsage: true},
	}
	if *seed >= 0 {
		req.Seed = seed
	}
	st, err := streamChat(ctx, cl, endpoint, &req, stdout)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "\n")
	fmt.Fprintf(stderr, "[%s · time to first token %s · %d tokens · %.0f tokens/s · finish_reason %s]\n",
		st.proto, st.ttft.Round(10*time.Microsecond), st.tokens, st.tokensPerSecond(), st.finishReason)
	return nil
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
		}
	}
	if err := sc.Err(); err != nil {
		return st, fmt.Errorf("reading stream: %w", err)
	}
	return st, errors.New("stream ended without [DONE]")
}
