package netemu

import (
	"fmt"
	"io"
	"net"
	"sync"
)

// UDPEndpoints opens the two ends of a link that carries one UDP client's
// datagrams to server and back, for tests that need a lossy path without
// network namespaces or root: clients is a socket on 127.0.0.1 (its
// address is addr) that the client sends to, toServer a socket connected
// to server. Run them through a Link with New(clients, toServer, ...);
// direction A to B is then client to server. A packet here is a whole
// datagram, not an IP packet, so the link carries UDP (QUIC) only.
func UDPEndpoints(server string) (clients, toServer io.ReadWriteCloser, addr string, err error) {
	sa, err := net.ResolveUDPAddr("udp", server)
	if err != nil {
		return nil, nil, "", err
	}
	ln, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, nil, "", err
	}
	up, err := net.DialUDP("udp", nil, sa)
	if err != nil {
		ln.Close()
		return nil, nil, "", fmt.Errorf("netemu: dial %s: %w", server, err)
	}
	return &clientSide{conn: ln}, up, ln.LocalAddr().String(), nil
}

// clientSide is the socket clients send to: a read yields a datagram and
// remembers who sent it; a write goes to the client heard from last, and
// is dropped before any client was heard from, as a path with nobody at
// its end would drop it.
type clientSide struct {
	conn *net.UDPConn
	mu   sync.Mutex
	peer *net.UDPAddr
}

func (c *clientSide) Read(p []byte) (int, error) {
	n, from, err := c.conn.ReadFromUDP(p)
	if err == nil {
		c.mu.Lock()
		c.peer = from
		c.mu.Unlock()
	}
	return n, err
}

func (c *clientSide) Write(p []byte) (int, error) {
	c.mu.Lock()
	peer := c.peer
	c.mu.Unlock()
	if peer == nil {
		return len(p), nil
	}
	return c.conn.WriteToUDP(p, peer)
}

func (c *clientSide) Close() error { return c.conn.Close() }
