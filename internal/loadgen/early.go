package loadgen

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"sync"
	"time"

	h3client "h3infer/client"
)

// earlyClient is one concurrent slot's h3infer client and its session
// tickets. Each slot has its own, so two requests in flight never share a
// connection or race for one ticket.
type earlyClient struct {
	cl      *h3client.Client
	tickets *ticketCache
}

// usesEarlyClient reports whether requests go through package client,
// which can send a POST in 0-RTT.
func (c Config) usesEarlyClient() bool {
	return c.ZeroRTT && c.Proto == ProtoH3 && c.Credential != ""
}

func newEarlyClients(cfg Config, base *tls.Config) (chan *earlyClient, error) {
	pool := make(chan *earlyClient, cfg.Concurrency)
	for range cfg.Concurrency {
		t := base.Clone()
		tickets := newTicketCache()
		t.ClientSessionCache = tickets
		cl, err := h3client.New(h3client.Config{TLS: t, Credential: cfg.Credential, QUICTracer: cfg.QUICTracer})
		if err != nil {
			return nil, fmt.Errorf("credential: %w", err)
		}
		pool <- &earlyClient{cl: cl, tickets: tickets}
	}
	return pool, nil
}

// primeEarly sends one short request on every slot, unmeasured, so that
// each holds a session ticket before the run and every measured request
// can resume.
func (c *client) primeEarly(ctx context.Context) error {
	for range c.cfg.Concurrency {
		s := c.doEarly(ctx, 1, 1, -1)
		if s.Err != "" {
			return fmt.Errorf("priming 0-RTT: %s: %s", s.Err, s.Detail)
		}
	}
	return nil
}

// ticketWait bounds the wait for a connection's new session ticket.
const ticketWait = 3 * time.Second

// doEarly sends one request over a new connection through package client:
// in 0-RTT with an early proof when the slot holds a ticket.
func (c *client) doEarly(ctx context.Context, promptWords, maxTokens, urgency int) Sample {
	s := Sample{Urgency: urgency}
	ec := <-c.early
	defer func() { c.early <- ec }()
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	header := http.Header{}
	header.Set("Content-Type", "application/json")
	header.Set("Accept", "text/event-stream")
	if urgency >= 0 {
		header.Set("Priority", fmt.Sprintf("u=%d", urgency))
	}
	gen := ec.tickets.generation()
	start := time.Now()
	res, err := ec.cl.Do(ctx, http.MethodPost, c.endpoint, header, c.payload(promptWords, maxTokens))
	if err != nil {
		s.E2E = time.Since(start)
		s.Err, s.Detail = classify(ctx, err, ErrConnect), err.Error()
		ec.cl.CloseConnections()
		return s
	}
	s.Early, s.Retried = res.Early, res.Retried
	// The early response body does not watch ctx; closing it ends a read
	// that outlives the timeout.
	stop := context.AfterFunc(ctx, func() { res.Body.Close() })
	c.finish(ctx, res.Response, start, &s)
	stop()
	res.Body.Close()
	// A ticket that carried 0-RTT is spent (the gateway allows one use),
	// and the server sends the next one only once the handshake is
	// confirmed, which for a short answer can be after its last token.
	// Wait for it, outside the measured time, before the connection goes.
	ec.tickets.waitNewer(ctx, gen, ticketWait)
	ec.cl.CloseConnections()
	return s
}

// ticketCache is a session cache that tells when a new ticket arrives.
type ticketCache struct {
	tls.ClientSessionCache
	mu      sync.Mutex
	gen     uint64
	changed chan struct{} // closed and replaced on every new ticket
}

func newTicketCache() *ticketCache {
	return &ticketCache{ClientSessionCache: tls.NewLRUClientSessionCache(4), changed: make(chan struct{})}
}

func (t *ticketCache) Put(key string, cs *tls.ClientSessionState) {
	t.ClientSessionCache.Put(key, cs)
	if cs == nil {
		return
	}
	t.mu.Lock()
	t.gen++
	close(t.changed)
	t.changed = make(chan struct{})
	t.mu.Unlock()
}

func (t *ticketCache) generation() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.gen
}

// waitNewer waits, at most d, for a ticket newer than generation gen.
func (t *ticketCache) waitNewer(ctx context.Context, gen uint64, d time.Duration) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		t.mu.Lock()
		now, ch := t.gen, t.changed
		t.mu.Unlock()
		if now > gen {
			return
		}
		select {
		case <-ch:
		case <-timer.C:
			return
		case <-ctx.Done():
			return
		}
	}
}
