package netemu

import (
	"log/slog"
	"net"
	"testing"
	"time"
)

// TestUDPEndpointsRelayThroughTheLink runs a UDP echo server behind a link
// of 20 ms each way: a datagram comes back whole, after at least the two
// delays, to the client that sent it.
func TestUDPEndpointsRelayThroughTheLink(t *testing.T) {
	const delay = 20 * time.Millisecond
	echo, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { echo.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := echo.ReadFromUDP(buf)
			if err != nil {
				return
			}
			echo.WriteToUDP(buf[:n], from)
		}
	}()

	clients, toServer, addr, err := UDPEndpoints(echo.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	dir := Direction{Delay: delay}
	l, err := New(clients, toServer, Config{AToB: dir, BToA: dir}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	runLink(t, l)

	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := make([]byte, 1200)
	for i := range msg {
		msg[i] = byte(i)
	}
	start := time.Now()
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no echo through the link: %v", err)
	}
	if rtt := time.Since(start); rtt < 2*delay {
		t.Errorf("echo after %s, before the link's two delays (%s)", rtt, 2*delay)
	}
	if string(buf[:n]) != string(msg) {
		t.Errorf("echo changed: %d bytes back of %d", n, len(msg))
	}
	// The link counts a packet once it has handed it on, which may be
	// just after the client read the echo: wait for the count to settle.
	ab, ba := l.Stats()
	for deadline := time.Now().Add(2 * time.Second); ba.Delivered < 1 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
		ab, ba = l.Stats()
	}
	if ab.Delivered != 1 || ba.Delivered != 1 {
		t.Errorf("delivered a_to_b %d, b_to_a %d; want 1 each", ab.Delivered, ba.Delivered)
	}
}
