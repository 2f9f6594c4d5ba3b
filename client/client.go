// Package client is h3infer's Go client for HTTP/3: it resumes sessions,
// sends requests in 0-RTT with a single-use early proof, binds its 1-RTT
// requests to the connection with an exporter proof, and retries once in
// 1-RTT when the gateway answers 425 or rejects 0-RTT. `h3infer chat` uses
// it; mobile apps can embed it.
//
// It must not import gateway.
package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/qlogwriter"

	"h3infer/tlsbind"
)

// Config configures a Client.
type Config struct {
	// TLS carries RootCAs and ServerName; the client clones it and adds
	// NextProtos and a session cache.
	TLS *tls.Config
	// Credential is what `h3infer token issue` printed.
	Credential string
	// Disable0RTT sends every request after the handshake.
	Disable0RTT bool
	// DialAddr, when set, is where packets go instead of the URL's
	// host:port (a relay in tests; the URL still names the server).
	DialAddr string
	// QUICTracer, when set, traces every connection (`h3infer bench
	// --qlog` writes qlog files through package qlogdir).
	QUICTracer func(context.Context, bool, quic.ConnectionID) qlogwriter.Trace
}

// Client sends requests to one or more gateways, one connection per
// host:port at a time.
type Client struct {
	cfg    Config
	tls    *tls.Config
	bearer string
	secret []byte

	mu    sync.Mutex
	conns map[string]*conn
}

type conn struct {
	qc *quic.Conn
	cc *http3.ClientConn
	tr *http3.Transport
}

// New checks cfg.
func New(cfg Config) (*Client, error) {
	bearer, secret, err := tlsbind.SplitCredential(cfg.Credential)
	if err != nil {
		return nil, err
	}
	t := &tls.Config{}
	if cfg.TLS != nil {
		t = cfg.TLS.Clone()
	}
	t.NextProtos = []string{http3.NextProtoH3}
	if t.ClientSessionCache == nil {
		t.ClientSessionCache = tls.NewLRUClientSessionCache(16)
	}
	return &Client{cfg: cfg, tls: t, bearer: bearer, secret: secret, conns: map[string]*conn{}}, nil
}

// Result says how a response was obtained.
type Result struct {
	*http.Response
	// Early reports that the request went out in 0-RTT and the gateway
	// served it before the handshake completed.
	Early bool
	// Retried reports a 425 or rejected 0-RTT that was sent again in 1-RTT.
	Retried bool
}

// Do sends method to url with body. The body is passed separately because
// an early proof covers its hash and a retry sends it again.
func (c *Client) Do(ctx context.Context, method, url string, header http.Header, body []byte) (*Result, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return nil, err
	}
	addr := req.URL.Host
	cn, err := c.connFor(ctx, addr)
	if err != nil {
		return nil, err
	}
	if !c.cfg.Disable0RTT && !handshakeDone(cn.qc) {
		resp, err := c.sendEarly(ctx, cn, method, url, header, body)
		switch {
		case err == nil && resp.StatusCode != http.StatusTooEarly:
			return &Result{Response: resp, Early: resp.Header.Get("H3infer-Early-Data") == "1"}, nil
		case err == nil:
			resp.Body.Close()
		case errors.Is(err, quic.Err0RTTRejected):
			// Everything sent in 0-RTT is gone, http3's control stream
			// included: start over on a connection that does not try 0-RTT.
			c.drop(addr, cn)
			if cn, err = c.dial(ctx, addr, false); err != nil {
				return nil, err
			}
		default:
			c.drop(addr, cn)
			return nil, err
		}
		resp, err = c.sendBound(ctx, cn, method, url, header, body)
		if err != nil {
			return nil, err
		}
		return &Result{Response: resp, Retried: true}, nil
	}
	resp, err := c.sendBound(ctx, cn, method, url, header, body)
	if err != nil {
		c.drop(addr, cn)
		return nil, err
	}
	return &Result{Response: resp}, nil
}

// sendEarly writes the request on a stream at once, with an early proof.
func (c *Client) sendEarly(ctx context.Context, cn *conn, method, url string, header http.Header, body []byte) (*http.Response, error) {
	req, err := c.newRequest(ctx, method, url, header, body)
	if err != nil {
		return nil, err
	}
	proof, err := tlsbind.NewEarlyProof(c.secret, time.Now(), method, req.URL.Path, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set(tlsbind.EarlyProofHeader, proof)
	str, err := cn.qc.OpenStreamSync(ctx)
	if err != nil {
		return nil, err
	}
	if err := writeEarlyRequest(str, req, body); err != nil {
		str.CancelRead(0x10c)
		return nil, err
	}
	resp, err := readEarlyResponse(str)
	if err != nil {
		str.CancelRead(0x10c)
	}
	return resp, err
}

// sendBound waits for the handshake and sends the request with a proof
// bound to this connection's exporter.
func (c *Client) sendBound(ctx context.Context, cn *conn, method, url string, header http.Header, body []byte) (*http.Response, error) {
	select {
	case <-cn.qc.HandshakeComplete():
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-cn.qc.Context().Done():
		return nil, context.Cause(cn.qc.Context())
	}
	// Only now: crypto/tls cannot export keying material on the client
	// before its handshake completes.
	cs := cn.qc.ConnectionState().TLS
	exp, err := cs.ExportKeyingMaterial(tlsbind.ExporterLabel, nil, tlsbind.ExporterLen)
	if err != nil {
		return nil, fmt.Errorf("exporter: %w", err)
	}
	req, err := c.newRequest(ctx, method, url, header, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set(tlsbind.BindingHeader, tlsbind.BindingProof(c.secret, exp))
	if len(body) > 0 {
		req.Body = io.NopCloser(bytes.NewReader(body))
	}
	return cn.cc.RoundTrip(req)
}

func (c *Client) newRequest(ctx context.Context, method, url string, header http.Header, body []byte) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return nil, err
	}
	for k, v := range header {
		req.Header[k] = append([]string(nil), v...)
	}
	req.Header.Set("Authorization", "Bearer "+c.bearer)
	req.ContentLength = int64(len(body))
	return req, nil
}

func (c *Client) connFor(ctx context.Context, addr string) (*conn, error) {
	c.mu.Lock()
	cn := c.conns[addr]
	c.mu.Unlock()
	if cn != nil && cn.qc.Context().Err() == nil {
		return cn, nil
	}
	return c.dial(ctx, addr, !c.cfg.Disable0RTT)
}

// dial connects, resuming a session when the cache has one; early allows
// requests in 0-RTT when the ticket permits it.
func (c *Client) dial(ctx context.Context, addr string, early bool) (*conn, error) {
	to := addr
	if c.cfg.DialAddr != "" {
		to = c.cfg.DialAddr
	}
	dial := quic.DialAddr
	if early {
		dial = quic.DialAddrEarly
	}
	qc, err := dial(ctx, to, c.tls, &quic.Config{Tracer: c.cfg.QUICTracer})
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	c.mu.Lock()
	old := c.conns[addr]
	c.mu.Unlock()
	return c.replace(addr, old, qc), nil
}

func (c *Client) replace(addr string, old *conn, qc *quic.Conn) *conn {
	tr := &http3.Transport{}
	cn := &conn{qc: qc, tr: tr, cc: tr.NewClientConn(qc)}
	c.mu.Lock()
	c.conns[addr] = cn
	c.mu.Unlock()
	if old != nil && old.qc != qc {
		old.close()
	}
	return cn
}

func (c *Client) drop(addr string, cn *conn) {
	c.mu.Lock()
	if c.conns[addr] == cn {
		delete(c.conns, addr)
	}
	c.mu.Unlock()
	cn.close()
}

func (cn *conn) close() {
	cn.qc.CloseWithError(0, "")
	cn.tr.Close()
}

// CloseConnections closes open connections but keeps session tickets, so
// the next request resumes, in 0-RTT when the ticket allows.
func (c *Client) CloseConnections() {
	c.mu.Lock()
	conns := c.conns
	c.conns = map[string]*conn{}
	c.mu.Unlock()
	for _, cn := range conns {
		cn.close()
	}
}

// Close closes every connection.
func (c *Client) Close() error {
	c.CloseConnections()
	return nil
}

func handshakeDone(c *quic.Conn) bool {
	select {
	case <-c.HandshakeComplete():
		return true
	default:
		return false
	}
}
