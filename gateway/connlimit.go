package gateway

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
)

// DefaultMaxConnectionsPerSource bounds the connections of one source
// address (an IPv4 address, an IPv6 /64). A browser holds one HTTP/3
// connection per origin, so one user needs one or two; the default leaves
// room for a carrier-grade NAT address that fronts dozens of this
// gateway's users at once, while one attacking address can hold at most
// this many connections times Config.PreauthStreams handler goroutines.
const DefaultMaxConnectionsPerSource = 64

// connBudget is the memory DefaultMaxConnections reserves per connection:
// a connection that has not authenticated may keep PreauthStreams (100)
// request streams in their header phase, about 8 KiB each (a goroutine and
// its buffers, measured), plus quic-go's connection state and the streams
// it holds unaccepted: about 1 MiB at worst, doubled for headroom.
const connBudget = 2 << 20

// Bounds of DefaultMaxConnections, for machines whose memory is unknown or
// extreme.
const (
	minDefaultConnections = 256
	maxDefaultConnections = 65536
)

// DefaultMaxConnections sizes Config.MaxConnections for this machine: a
// quarter of its physical memory at connBudget per connection (4 GiB:
// 512; 64 GiB: 8192), at least 256 and at most 65536.
func DefaultMaxConnections() int {
	var si syscall.Sysinfo_t
	if err := syscall.Sysinfo(&si); err != nil {
		return minDefaultConnections
	}
	n := uint64(si.Totalram) * uint64(si.Unit) / 4 / connBudget
	return int(min(max(n, minDefaultConnections), maxDefaultConnections))
}

// Reasons a connection is refused, the reason label of
// h3infer_connections_refused_total.
const (
	refusedTotal  = "total"
	refusedSource = "source"
)

// connLimiter bounds the connections of both listeners, in total and per
// source. Every connection takes a slot in the total when it arrives. Its
// source is counted once its address is proven by a completed handshake
// (TCP or QUIC): a source counted on an unproven address, or on a QUIC
// address token (sent in the clear, so replayable from a spoofed address),
// could be made to lock its owner out. A map entry exists only while its source holds a connection, so the
// map is bounded by the total.
type connLimiter struct {
	maxTotal, maxPerSource int
	refused                *prometheus.CounterVec // by listener and reason
	// closedUnauthenticated counts connections closed at
	// Config.AuthTimeout, by listener.
	closedUnauthenticated *prometheus.CounterVec

	mu       sync.Mutex
	total    int
	bySource map[netip.Addr]int
}

func newConnLimiter(maxTotal, maxPerSource int, reg prometheus.Registerer) (*connLimiter, error) {
	l := &connLimiter{
		maxTotal:     maxTotal,
		maxPerSource: maxPerSource,
		bySource:     map[netip.Addr]int{},
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_connections_refused_total",
			Help: "Connections refused at gateway.max_connections (reason total) or gateway.max_connections_per_source (reason source), by listener (quic, tcp).",
		}, []string{"listener", "reason"}),
	}
	l.closedUnauthenticated = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "h3infer_connections_closed_unauthenticated_total",
		Help: "Connections closed because none of their requests passed authentication within gateway.auth_timeout, by listener (quic, tcp).",
	}, []string{"listener"})
	for _, ln := range []string{"quic", "tcp"} {
		for _, r := range []string{refusedTotal, refusedSource} {
			l.refused.WithLabelValues(ln, r)
		}
		l.closedUnauthenticated.WithLabelValues(ln)
	}
	for _, c := range []prometheus.Collector{l.refused, l.closedUnauthenticated} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("gateway: register metrics: %w", err)
		}
	}
	return l, nil
}

// sourceOf keys a remote address: IPv4 addresses (IPv4-mapped ones
// included) by address, IPv6 by /64, the block one subscriber gets.
func sourceOf(a net.Addr) netip.Addr {
	var ap netip.AddrPort
	switch a := a.(type) {
	case *net.UDPAddr:
		ap = a.AddrPort()
	case *net.TCPAddr:
		ap = a.AddrPort()
	default:
		return netip.Addr{}
	}
	ip := ap.Addr().Unmap()
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.Addr()
	}
	return ip
}

// connSlot is one connection's place in the limiter.
type connSlot struct {
	l       *connLimiter
	src     netip.Addr
	counted bool // against its source; guarded by l.mu
	done    bool // released; guarded by l.mu
}

// open takes a slot for a connection from src, counted against its source
// at once when verified. It returns the refusal reason instead when a
// limit is reached.
func (l *connLimiter) open(listener string, src netip.Addr, verified bool) (*connSlot, string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.total >= l.maxTotal {
		l.refused.WithLabelValues(listener, refusedTotal).Inc()
		return nil, refusedTotal
	}
	if verified && l.bySource[src] >= l.maxPerSource {
		l.refused.WithLabelValues(listener, refusedSource).Inc()
		return nil, refusedSource
	}
	l.total++
	s := &connSlot{l: l, src: src}
	if verified {
		l.bySource[src]++
		s.counted = true
	}
	return s, ""
}

// busy reports whether a connection attempt from src would be refused if
// its address were proven: quic-go then asks an unproven one for a Retry
// first, so that only the owner of an address is refused for it.
func (l *connLimiter) busy(src netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total >= l.maxTotal || l.bySource[src] >= l.maxPerSource
}

// verify counts s against its source now that its address is proven. It
// reports false, and counts the refusal, when the source is already at its
// limit; the caller then closes the connection and releases s.
func (s *connSlot) verify(listener string) bool {
	l := s.l
	l.mu.Lock()
	defer l.mu.Unlock()
	if s.counted || s.done {
		return true
	}
	if l.bySource[s.src] >= l.maxPerSource {
		l.refused.WithLabelValues(listener, refusedSource).Inc()
		return false
	}
	l.bySource[s.src]++
	s.counted = true
	return true
}

// release gives the slot back; calling it again does nothing.
func (s *connSlot) release() {
	l := s.l
	l.mu.Lock()
	defer l.mu.Unlock()
	if s.done {
		return
	}
	s.done = true
	l.total--
	if s.counted {
		if n := l.bySource[s.src] - 1; n > 0 {
			l.bySource[s.src] = n
		} else {
			delete(l.bySource, s.src)
		}
	}
}

// limitListener applies the limiter to a TCP listener. TCP's handshake
// proves the source address, so a connection is counted against its source
// when accepted; one over a limit is closed at once, before TLS.
type limitListener struct {
	net.Listener
	l *connLimiter
}

func (ln limitListener) Accept() (net.Conn, error) {
	for {
		c, err := ln.Listener.Accept()
		if err != nil {
			return nil, err
		}
		slot, _ := ln.l.open("tcp", sourceOf(c.RemoteAddr()), true)
		if slot == nil {
			c.Close()
			continue
		}
		return &limitedConn{Conn: c, slot: slot}, nil
	}
}

type limitedConn struct {
	net.Conn
	slot *connSlot
}

func (c *limitedConn) Close() error {
	c.slot.release()
	return c.Conn.Close()
}
