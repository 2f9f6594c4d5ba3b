// Package udprelay is a UDP relay for tests: it sits between one QUIC
// client and a server on loopback, records what the client sends, can hold
// back the client's or the server's Handshake packets (so that the server
// sees the client's 0-RTT requests before the handshake completes), and
// replays recorded datagrams
// from a fresh address, as an attacker on the path would.
package udprelay

import (
	"errors"
	"net"
	"sync"
	"time"
)

// Relay forwards datagrams between clients and one server address.
type Relay struct {
	ln     *net.UDPConn
	server *net.UDPAddr

	mu           sync.Mutex
	holdHS       time.Duration // the client's Handshake datagrams
	holdServerHS time.Duration // the server's
	recording    bool
	recorded     [][]byte
	upstreams    map[string]*net.UDPConn
	wg           sync.WaitGroup
	closed       bool

	held        sync.WaitGroup // datagrams being held back
	release     chan struct{}  // closed by Release: held datagrams go now
	releaseOnce sync.Once
}

// New listens on 127.0.0.1 and relays to server.
func New(server string) (*Relay, error) {
	sa, err := net.ResolveUDPAddr("udp", server)
	if err != nil {
		return nil, err
	}
	ln, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	r := &Relay{ln: ln, server: sa, upstreams: map[string]*net.UDPConn{}, release: make(chan struct{})}
	r.wg.Go(r.readClients)
	return r, nil
}

// Addr is where clients should send.
func (r *Relay) Addr() string { return r.ln.LocalAddr().String() }

// HoldHandshake delays every client datagram that starts with a QUIC v1
// Handshake packet by d (0 turns it off).
func (r *Relay) HoldHandshake(d time.Duration) {
	r.mu.Lock()
	r.holdHS = d
	r.mu.Unlock()
}

// HoldServerHandshake delays every server datagram that carries a QUIC v1
// Handshake packet by d (0 turns it off). Neither side can then complete
// its handshake until d has passed: the client needs the server's
// Finished, and the server the client's, which the client sends only
// after. Holding the client's Handshake packets alone leaves the client
// free to complete its side at once and send its request in 1-RTT.
func (r *Relay) HoldServerHandshake(d time.Duration) {
	r.mu.Lock()
	r.holdServerHS = d
	r.mu.Unlock()
}

// Release stops holding Handshake packets and sends the ones held back now,
// returning once they are written. A test calls it before closing its
// client, so that the connection can finish and close cleanly rather than
// leave the server to wait out its idle timeout.
func (r *Relay) Release() {
	r.mu.Lock()
	r.holdHS, r.holdServerHS = 0, 0
	r.mu.Unlock()
	r.releaseOnce.Do(func() { close(r.release) })
	r.held.Wait()
}

// Record starts recording client datagrams afresh.
func (r *Relay) Record() {
	r.mu.Lock()
	r.recording, r.recorded = true, nil
	r.mu.Unlock()
}

// Recorded returns the datagrams recorded since Record.
func (r *Relay) Recorded() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]byte(nil), r.recorded...)
}

// isHandshake reports whether a datagram carries a QUIC v1 Handshake
// packet: a long header (0x80) with type 2 in bits 4-5 (RFC 9000 section
// 17.2). A client may coalesce its Finished behind an Initial that
// acknowledges the server's (section 12.2), so every long-header packet of
// the datagram is looked at, not only the first; neither the type bits nor
// the Length field are under header protection.
func isHandshake(b []byte) bool {
	for len(b) > 0 && b[0]&0x80 != 0 {
		typ := (b[0] >> 4) & 0x3
		if typ == 2 {
			return true
		}
		if typ == 3 { // Retry: no Length, nothing coalesced behind it
			return false
		}
		// Version, then the connection IDs, each after its length byte.
		rest := b[1:]
		if len(rest) < 5 {
			return false
		}
		rest = rest[4:]
		for range 2 {
			if len(rest) < 1 || len(rest) < 1+int(rest[0]) {
				return false
			}
			rest = rest[1+int(rest[0]):]
		}
		if typ == 0 { // Initial: a token before the Length
			n, l := quicvarint(rest)
			if l == 0 || uint64(len(rest)-l) < n {
				return false
			}
			rest = rest[l+int(n):]
		}
		n, l := quicvarint(rest)
		if l == 0 || uint64(len(rest)-l) < n {
			return false
		}
		b = rest[l+int(n):]
	}
	return false
}

// quicvarint decodes a variable-length integer (RFC 9000 section 16); l is
// 0 when b is too short.
func quicvarint(b []byte) (v uint64, l int) {
	if len(b) == 0 {
		return 0, 0
	}
	l = 1 << (b[0] >> 6)
	if len(b) < l {
		return 0, 0
	}
	v = uint64(b[0] & 0x3f)
	for _, c := range b[1:l] {
		v = v<<8 | uint64(c)
	}
	return v, l
}

func (r *Relay) readClients() {
	buf := make([]byte, 65536)
	for {
		n, from, err := r.ln.ReadFromUDP(buf)
		if err != nil {
			return
		}
		b := append([]byte(nil), buf[:n]...)
		up, err := r.upstream(from)
		if err != nil {
			return
		}
		r.mu.Lock()
		if r.recording {
			r.recorded = append(r.recorded, b)
		}
		r.mu.Unlock()
		r.forward(&r.holdHS, b, func() { up.Write(b) })
	}
}

// forward sends datagram b with send, at once or, when *hold is set and b
// carries a Handshake packet, once *hold has passed or Release is called.
func (r *Relay) forward(hold *time.Duration, b []byte, send func()) {
	r.mu.Lock()
	d := *hold
	if d > 0 && isHandshake(b) {
		// Counted under mu: Release turns holding off under mu before
		// it waits, so no count can start after its wait.
		r.held.Add(1)
	} else {
		d = 0
	}
	r.mu.Unlock()
	if d == 0 {
		send()
		return
	}
	r.wg.Go(func() {
		defer r.held.Done()
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-r.release:
		}
		send()
	})
}

// upstream is the relay's socket towards the server for one client.
func (r *Relay) upstream(client *net.UDPAddr) (*net.UDPConn, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, errors.New("relay closed")
	}
	if up := r.upstreams[client.String()]; up != nil {
		return up, nil
	}
	up, err := net.DialUDP("udp", nil, r.server)
	if err != nil {
		return nil, err
	}
	r.upstreams[client.String()] = up
	r.wg.Go(func() {
		buf := make([]byte, 65536)
		for {
			n, err := up.Read(buf)
			if err != nil {
				return
			}
			b := append([]byte(nil), buf[:n]...)
			r.forward(&r.holdServerHS, b, func() { r.ln.WriteToUDP(b, client) })
		}
	})
	return up, nil
}

// Replay sends datagrams to target from a new socket, as an attacker
// would, and drains what comes back for linger so the server sees a live
// peer.
func Replay(target string, datagrams [][]byte, linger time.Duration) error {
	ta, err := net.ResolveUDPAddr("udp", target)
	if err != nil {
		return err
	}
	c, err := net.DialUDP("udp", nil, ta)
	if err != nil {
		return err
	}
	defer c.Close()
	for _, d := range datagrams {
		if _, err := c.Write(d); err != nil {
			return err
		}
	}
	c.SetReadDeadline(time.Now().Add(linger))
	buf := make([]byte, 65536)
	for {
		if _, err := c.Read(buf); err != nil {
			return nil
		}
	}
}

// Close stops the relay and waits for its goroutines.
func (r *Relay) Close() error {
	r.mu.Lock()
	r.closed = true
	ups := r.upstreams
	r.upstreams = nil
	r.mu.Unlock()
	err := r.ln.Close()
	for _, up := range ups {
		up.Close()
	}
	r.wg.Wait()
	return err
}
