// Package bareserver is the baseline h3infer bench compares the gateway
// against: a bare quic-go HTTP/3 server (and TCP h1/h2 on the same port)
// whose handler writes the same server-sent events as a gateway serving a
// synthetic model, with no scheduler, ring or worker in between. The
// difference between the two is the gateway's overhead.
//
// It imports nothing of the gateway, so a change there cannot make the
// baseline move with it.
package bareserver

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// Token is the text of every token; the same as the synthetic model's.
const Token = " tok"

// Config configures the server.
type Config struct {
	// Listen is host:port for UDP and TCP; port 0 picks one free on both.
	Listen string
	// TLS carries the certificate.
	TLS *tls.Config
	// Interval paces each stream at one token per Interval; 0 writes them
	// as fast as the connection takes them.
	Interval time.Duration
	// ZeroRTT lets resumed clients send requests as early data.
	ZeroRTT bool
}

// Server is a running bare server.
type Server struct {
	cfg     Config
	log     *slog.Logger
	addr    string
	udp     net.PacketConn
	tcpLn   net.Listener
	h3      *http3.Server
	tcp     *http.Server
	serving sync.WaitGroup
}

// Start opens the sockets and serves until Close.
func Start(cfg Config, log *slog.Logger) (*Server, error) {
	if cfg.TLS == nil {
		return nil, errors.New("bareserver: a TLS config with a certificate is required")
	}
	udp, tcpLn, err := listenPair(cfg.Listen)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: log, udp: udp, tcpLn: tcpLn, addr: tcpLn.Addr().String()}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/chat/completions", s.chat)
	s.h3 = &http3.Server{
		Handler:    mux,
		TLSConfig:  http3.ConfigureTLSConfig(cfg.TLS.Clone()),
		QUICConfig: &quic.Config{Allow0RTT: cfg.ZeroRTT, MaxIncomingStreams: 4096},
		Logger:     log,
	}
	tcpTLS := cfg.TLS.Clone()
	tcpTLS.NextProtos = []string{"h2", "http/1.1"}
	s.tcp = &http.Server{Handler: mux, TLSConfig: tcpTLS, ReadHeaderTimeout: 10 * time.Second}
	s.serving.Go(func() {
		if err := s.h3.Serve(udp); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, quic.ErrServerClosed) {
			log.Error("bare http3 server stopped", "err", err)
		}
	})
	s.serving.Go(func() {
		if err := s.tcp.ServeTLS(tcpLn, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("bare tcp server stopped", "err", err)
		}
	})
	return s, nil
}

// listenPair binds UDP and TCP on the same port, retrying when port 0
// gives a TCP port whose UDP twin is taken.
func listenPair(addr string) (net.PacketConn, net.Listener, error) {
	for range 20 {
		tcpLn, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, nil, fmt.Errorf("bareserver: listen tcp %s: %w", addr, err)
		}
		udp, err := net.ListenPacket("udp", tcpLn.Addr().String())
		if err == nil {
			return udp, tcpLn, nil
		}
		tcpLn.Close()
		if _, port, _ := net.SplitHostPort(addr); port != "0" {
			return nil, nil, fmt.Errorf("bareserver: listen udp %s: %w", addr, err)
		}
	}
	return nil, nil, fmt.Errorf("bareserver: no port free on both udp and tcp for %s", addr)
}

// Addr is the host:port the server listens on (UDP and TCP).
func (s *Server) Addr() string { return s.addr }

// Close stops both listeners at once and waits for the serving goroutines.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := errors.Join(s.h3.Shutdown(ctx), s.tcp.Shutdown(ctx))
	s.h3.Close()
	s.tcp.Close()
	s.udp.Close()
	s.serving.Wait()
	return err
}

type chatRequest struct {
	Model     string `json:"model"`
	MaxTokens int    `json:"max_tokens"`
	Stream    bool   `json:"stream"`
	Messages  []struct {
		Content string `json:"content"`
	} `json:"messages"`
	StreamOptions struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

// The chunk shapes the gateway streams for chat completions.
type delta struct {
	Role    string  `json:"role,omitempty"`
	Content *string `json:"content,omitempty"`
}

type choice struct {
	Index        int       `json:"index"`
	Delta        delta     `json:"delta"`
	Logprobs     *struct{} `json:"logprobs"`
	FinishReason *string   `json:"finish_reason"`
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

type chunk struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
	Choices any    `json:"choices"`
	Usage   *usage `json:"usage,omitempty"`
}

func (s *Server) chat(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
	var req chatRequest
	if err == nil {
		err = json.Unmarshal(body, &req)
	}
	if err != nil || !req.Stream || req.MaxTokens < 1 {
		http.Error(w, `{"error":{"message":"want a streamed chat completion with max_tokens","type":"invalid_request_error"}}`, http.StatusBadRequest)
		return
	}
	words := 0
	for _, m := range req.Messages {
		words += len(strings.Fields(m.Content))
	}
	base := chunk{ID: "chatcmpl-" + rand.Text(), Object: "chat.completion.chunk", Created: time.Now().Unix(), Model: req.Model}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	send := func(c chunk) bool {
		b, _ := json.Marshal(c)
		if _, err := w.Write(append(append([]byte("data: "), b...), "\n\n"...)); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	empty, text := "", Token
	c := base
	c.Choices = []choice{{Delta: delta{Role: "assistant", Content: &empty}}}
	if !send(c) {
		return
	}
	next := time.Now()
	for range req.MaxTokens {
		if s.cfg.Interval > 0 {
			next = next.Add(s.cfg.Interval)
			select {
			case <-time.After(time.Until(next)):
			case <-r.Context().Done():
				return
			}
		}
		c.Choices = []choice{{Delta: delta{Content: &text}}}
		if !send(c) {
			return
		}
	}
	reason := "length"
	c.Choices = []choice{{FinishReason: &reason}}
	if !send(c) {
		return
	}
	if req.StreamOptions.IncludeUsage {
		c.Choices = []struct{}{}
		c.Usage = &usage{PromptTokens: words, CompletionTokens: req.MaxTokens, TotalTokens: words + req.MaxTokens}
		if !send(c) {
			return
		}
	}
	w.Write([]byte("data: [DONE]\n\n"))
}
