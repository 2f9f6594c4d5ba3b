package gateway

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// The gateway runs its own HTTP/3 accept loop around http3.RawServerConn
// instead of http3.Server.ServeListener, which has no header deadline and
// starts a handler goroutine for every stream a peer opens: a peer that
// opens streams and sends two bytes on each would hold a goroutine per
// stream until it closed the connection. Here
//   - each request stream must deliver its headers within HeaderTimeout,
//     else it is reset (H3_REQUEST_INCOMPLETE) and its goroutine ends;
//   - a connection may have PreauthStreams requests in their handlers until
//     one of its requests has passed the auth guard, MaxStreams after. The
//     QUIC stream limit cannot be raised after the handshake (quic-go sends
//     MAX_STREAMS only to replace completed streams, up to the
//     MaxIncomingStreams of the handshake), so MaxStreams is advertised and
//     the loop stops taking streams from quic-go while at the cap: the rest
//     wait there, without a goroutine;
//   - connections are bounded in total and per source (connLimiter), and
//     idle ones by MaxIdleConnections (idleConns).
//
// What ServeListener did besides: on Shutdown, streams that arrive get
// H3_REQUEST_REJECTED, running handlers get the grace, and a connection is
// closed with H3_NO_ERROR once its handlers are done. RawServerConn keeps
// the control stream to itself, so no GOAWAY can be sent: clients learn of
// the shutdown from the rejected streams and the close.

// http3 error codes (RFC 9114 section 8.1) the loop uses.
const (
	h3NoError         = quic.ApplicationErrorCode(http3.ErrCodeNoError)
	h3InternalError   = quic.ApplicationErrorCode(http3.ErrCodeInternalError)
	h3ExcessiveLoad   = quic.ApplicationErrorCode(http3.ErrCodeExcessiveLoad)
	h3RequestRejected = quic.StreamErrorCode(http3.ErrCodeRequestRejected)
)

// closeLinger is added to three smoothed RTTs to let the last responses
// of a draining connection be delivered and acknowledged before it is
// closed: a CONNECTION_CLOSE discards whatever stream data is still
// unsent or unacknowledged. It covers the peer's ACK delay (25 ms).
const closeLinger = 30 * time.Millisecond

// maxIncomingUniStreams bounds the peer's unidirectional streams: HTTP/3
// needs three (control, QPACK encoder and decoder). Those the gateway
// does not read (see serveH3Conn) hold their buffered data in quic-go.
const maxIncomingUniStreams = 16

type connGateKey struct{}

// connGate is one HTTP/3 connection's state: its limiter slot and how
// many of its requests are in handlers against which cap.
type connGate struct {
	slot *connSlot
	// authed is set once a request on the connection passed the guard;
	// the cap is then MaxStreams instead of PreauthStreams.
	authed atomic.Bool
	active atomic.Int64
	// wake is signalled when a handler returns or the cap rises; its
	// buffer of one means a signal sent while nobody waits is kept.
	wake chan struct{}
	// close ends the connection with H3_NO_ERROR when it is evicted
	// (idleConns), and rtt is its smoothed RTT; both are set before the
	// connection is first filed there.
	close func()
	rtt   func() time.Duration

	// Guarded by idleConns.mu: the idle list the connection is in, its
	// neighbours there, whether a request of it has ended, whether it is
	// ending, and whether it is evicted and about to be closed.
	list                   *idleList
	prev, next             *connGate
	served, gone, evicting bool

	// merge is the connection's token-merging state (merge.go), made by
	// its first event stream.
	merge atomic.Pointer[mergeState]
}

// merging returns the connection's token-merging state, made on first use.
func (c *connGate) merging(conn connStatser) *mergeState {
	if m := c.merge.Load(); m != nil {
		return m
	}
	c.merge.CompareAndSwap(nil, newMergeState(conn, time.Now()))
	return c.merge.Load()
}

func (c *connGate) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// markAuthenticated raises the stream cap of the HTTP/3 connection a
// request came on, after the guard has let the request through.
func markAuthenticated(ctx context.Context) {
	if c, ok := ctx.Value(connGateKey{}).(*connGate); ok && !c.authed.Load() {
		c.authed.Store(true)
		c.signal()
	}
}

// quicConnContext runs in quic-go before a connection's handshake. It takes
// the connection's limiter slot (refusing the connection with
// CONNECTION_REFUSED when a limit is reached) and stashes the connection's
// gate, which every context of the connection inherits. The slot is
// released when the connection ends, handshake failures included.
func (g *Gateway) quicConnContext(ctx context.Context, info *quic.ClientInfo) (context.Context, error) {
	// Not counted against its source yet even when the address is
	// verified: a NEW_TOKEN token travels in the clear and is good for a
	// day, so whoever saw one could replay it from the owner's spoofed
	// address to fill the owner's quota with handshakes that never end.
	// The completed handshake proves the address (serveH3Conn).
	slot, reason := g.conns.open("quic", sourceOf(info.RemoteAddr), false)
	if slot == nil {
		return nil, errors.New("connection limit reached: " + reason)
	}
	context.AfterFunc(ctx, slot.release)
	gate := &connGate{slot: slot, wake: make(chan struct{}, 1)}
	gate.authed.Store(g.cfg.Auth.Disabled)
	return context.WithValue(ctx, connGateKey{}, gate), nil
}

// tcpConnContext gives a TCP connection the gate that markAuthenticated
// sets, and closes the connection if none of its requests has passed the
// guard within AuthTimeout.
func (g *Gateway) tcpConnContext(ctx context.Context, c net.Conn) context.Context {
	if g.cfg.Auth.Disabled {
		return ctx
	}
	gate := &connGate{}
	g.tcpAuthTimers.Store(c, time.AfterFunc(time.Duration(g.cfg.AuthTimeout), func() {
		if !gate.authed.Load() {
			g.conns.closedUnauthenticated.WithLabelValues("tcp").Inc()
			c.Close()
		}
	}))
	return context.WithValue(ctx, connGateKey{}, gate)
}

// tcpConnState stops a TCP connection's authentication deadline when the
// connection ends, so the deadline never fires for a connection gone.
func (g *Gateway) tcpConnState(c net.Conn, s http.ConnState) {
	if s != http.StateClosed && s != http.StateHijacked {
		return
	}
	if t, ok := g.tcpAuthTimers.LoadAndDelete(c); ok {
		t.(*time.Timer).Stop()
	}
}

// serveH3 accepts connections until the grace context ends.
func (g *Gateway) serveH3(ln *quic.EarlyListener) {
	defer close(g.h3Accepted)
	for {
		conn, err := ln.Accept(g.h3Grace)
		if err != nil {
			if g.h3Grace.Err() == nil && !errors.Is(err, quic.ErrServerClosed) {
				g.log.Error("http3 listener stopped", "addr", g.addr, "err", err)
			}
			return
		}
		gate, ok := conn.Context().Value(connGateKey{}).(*connGate)
		if !ok {
			conn.CloseWithError(h3InternalError, "")
			continue
		}
		g.h3Conns.Go(func() { g.serveH3Conn(conn, gate) })
	}
}

// serveH3Conn serves one connection's streams until it closes; it returns
// once every handler has.
func (g *Gateway) serveH3Conn(conn *quic.Conn, gate *connGate) {
	hc, err := g.h3.NewRawServerConn(conn)
	if err != nil {
		g.log.Debug("http3 connection setup failed", "err", err)
		conn.CloseWithError(h3InternalError, "")
		return
	}
	gate.close = func() { hc.CloseWithError(h3NoError, "idle connection closed under load") }
	gate.rtt = func() time.Duration { return conn.ConnectionStats().SmoothedRTT }
	defer g.idle.drop(gate)
	if !gate.authed.Load() {
		// A connection that never authenticates would otherwise hold its
		// slot for as long as its peer keeps it alive with PINGs: enough
		// of them would fill max_connections for everyone.
		t := time.AfterFunc(time.Duration(g.cfg.AuthTimeout), func() {
			if !gate.authed.Load() {
				g.conns.closedUnauthenticated.WithLabelValues("quic").Inc()
				hc.CloseWithError(h3NoError, "no authenticated request")
			}
		})
		defer t.Stop()
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		// An address not proven when the connection arrived is proven by
		// the completed handshake; only then does it count for its source.
		select {
		case <-conn.HandshakeComplete():
		case <-conn.Context().Done():
			return
		}
		if !gate.slot.verify("quic") {
			hc.CloseWithError(h3ExcessiveLoad, "too many connections from this source")
		}
	})
	wg.Go(func() {
		// One goroutine takes all of the peer's unidirectional streams,
		// not one each: http3 reads a stream's type and returns at once
		// for every type but the control stream, which it reads until the
		// connection ends. Streams the peer opens after its control
		// stream stay unaccepted in quic-go (at most
		// maxIncomingUniStreams): an HTTP/3 peer opens only its two QPACK
		// streams besides, and those carry nothing the gateway reads,
		// since its dynamic table is off. An idle connection so holds one
		// goroutine here instead of two.
		for {
			str, err := conn.AcceptUniStream(context.Background())
			if err != nil {
				return
			}
			hc.HandleUnidirectionalStream(str)
		}
	})

	var handlers sync.WaitGroup
	ctx := g.h3Grace
	draining := false
	for {
		if !draining && !waitForStreamCap(ctx, conn, gate, g.cfg.PreauthStreams, g.cfg.MaxStreams) {
			// Past the grace the AcceptStream below fails at once and
			// starts the drain.
			if conn.Context().Err() != nil {
				return
			}
			if g.h3Close.Err() != nil {
				hc.CloseWithError(h3NoError, "")
				return
			}
		}
		str, err := conn.AcceptStream(ctx)
		if err != nil {
			if conn.Context().Err() != nil {
				return
			}
			if g.h3Close.Err() != nil {
				hc.CloseWithError(h3NoError, "")
				return
			}
			if !draining {
				// Graceful shutdown: keep accepting, to reject, until the
				// handlers are done; then close.
				draining = true
				ctx = g.h3Close
				wg.Go(func() {
					handlers.Wait()
					g.closeWhenDelivered(conn, hc)
				})
			}
			continue
		}
		if draining {
			str.CancelRead(h3RequestRejected)
			str.CancelWrite(h3RequestRejected)
			continue
		}
		// A stream that cannot have this deadline set is already reset.
		_ = str.SetReadDeadline(time.Now().Add(time.Duration(g.cfg.HeaderTimeout)))
		gate.active.Add(1)
		g.idle.update(gate, false)
		handlers.Add(1)
		wg.Go(func() {
			defer handlers.Done()
			defer gate.signal()
			defer func() {
				gate.active.Add(-1)
				g.idle.update(gate, true)
			}()
			hc.HandleRequestStream(str)
		})
	}
}

// waitForStreamCap blocks while the connection has as many requests in
// handlers as its cap allows. It reports false when ctx or the connection
// ends first.
func waitForStreamCap(ctx context.Context, conn *quic.Conn, gate *connGate, preauth, authed int) bool {
	for {
		limit := int64(preauth)
		if gate.authed.Load() {
			limit = int64(authed)
		}
		if gate.active.Load() < limit {
			return true
		}
		select {
		case <-gate.wake:
		case <-ctx.Done():
			return false
		case <-conn.Context().Done():
			return false
		}
	}
}

// closeWhenDelivered closes a drained connection with H3_NO_ERROR once its
// last responses had time to be acknowledged, or at once when the hard
// cutoff comes.
func (g *Gateway) closeWhenDelivered(conn *quic.Conn, hc *http3.RawServerConn) {
	t := time.NewTimer(3*conn.ConnectionStats().SmoothedRTT + closeLinger)
	defer t.Stop()
	select {
	case <-t.C:
	case <-g.h3Close.Done():
	case <-conn.Context().Done():
		return
	}
	hc.CloseWithError(h3NoError, "")
}

// clearHeaderDeadline lifts the header deadline of an HTTP/3 request
// stream once its headers are in: the body may take as long as the
// handler allows.
func clearHeaderDeadline(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d, ok := w.(interface{ SetReadDeadline(time.Time) error }); ok {
			_ = d.SetReadDeadline(time.Time{})
		}
		next.ServeHTTP(w, r)
	})
}

// shutdownH3 stops accepting HTTP/3 connections and streams and waits for
// every connection to drain and close, or for ctx to end; then it closes
// what is left with H3_NO_ERROR.
func (g *Gateway) shutdownH3(ctx context.Context) error {
	g.h3GraceEnd()
	// No connection is added to h3Conns once the accept loop is over.
	<-g.h3Accepted
	done := make(chan struct{})
	go func() {
		g.h3Conns.Wait()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	g.h3CloseAll()
	<-done
	return err
}
