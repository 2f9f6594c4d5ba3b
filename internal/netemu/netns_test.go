package netemu

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestLinkAcrossNamespaces runs the emulator as the benchmark script does:
// two network namespaces, a TUN device in each on one /30, and a UDP echo
// across them. It needs root, `ip` and /dev/net/tun, which .ci/run has;
// without them it fails saying so rather than passing untested.
func TestLinkAcrossNamespaces(t *testing.T) {
	const delay = 25 * time.Millisecond
	nsA, nsB := fmt.Sprintf("h3i-emu-%d-a", os.Getpid()), fmt.Sprintf("h3i-emu-%d-b", os.Getpid())
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s\n(this test needs root, iproute2, network namespaces and /dev/net/tun)",
				strings.Join(args, " "), err, out)
		}
	}
	for _, ns := range []string{nsA, nsB} {
		ip("netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		ip("-n", ns, "link", "set", "lo", "up")
		ip("-n", ns, "tuntap", "add", "dev", "emu0", "mode", "tun")
	}
	ip("-n", nsA, "addr", "add", "10.78.0.1/30", "dev", "emu0")
	ip("-n", nsB, "addr", "add", "10.78.0.2/30", "dev", "emu0")
	ip("-n", nsA, "link", "set", "emu0", "up")
	ip("-n", nsB, "link", "set", "emu0", "up")

	a, err := OpenTUN("/run/netns/"+nsA, "emu0")
	if err != nil {
		t.Fatal(err)
	}
	b, err := OpenTUN("/run/netns/"+nsB, "emu0")
	if err != nil {
		a.Close()
		t.Fatal(err)
	}
	// Carrier comes on when a device is attached, but the kernel starts
	// passing its packets (and reports it UP) only once its link watcher
	// runs, up to a second later; until then it drops them.
	for _, ns := range []string{nsA, nsB} {
		waitUp(t, ns, "emu0")
	}
	if _, err := OpenTUN("/run/netns/"+nsA, "nosuch0"); err == nil {
		t.Error("OpenTUN attached to a device that does not exist")
	}
	l, err := New(a, b, Config{AToB: Direction{Delay: delay, Seed: 1}, BToA: Direction{Delay: delay, Seed: 2}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	runLink(t, l)

	var server, cl net.PacketConn
	inNetns(t, nsB, func() { server, err = net.ListenPacket("udp4", "10.78.0.2:0") })
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	inNetns(t, nsA, func() { cl, err = net.ListenPacket("udp4", "10.78.0.1:0") })
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	echoDone := make(chan struct{})
	go func() {
		defer close(echoDone)
		buf := make([]byte, 2048)
		for {
			n, from, err := server.ReadFrom(buf)
			if err != nil {
				return
			}
			server.WriteTo(buf[:n], from)
		}
	}()
	defer func() { server.Close(); <-echoDone }()

	buf := make([]byte, 2048)
	for i := range 5 {
		msg := fmt.Appendf(nil, "echo %d", i)
		sent := time.Now()
		if _, err := cl.WriteTo(msg, server.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		cl.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, _, err := cl.ReadFrom(buf)
		if err != nil {
			t.Fatalf("echo %d: %v", i, err)
		}
		if string(buf[:n]) != string(msg) {
			t.Fatalf("echo %d: got %q", i, buf[:n])
		}
		// A lower bound only, which delay emulation guarantees.
		if rtt := time.Since(sent); rtt < 2*delay {
			t.Errorf("echo %d: round trip %s, below the emulated %s", i, rtt, 2*delay)
		}
	}
	ab, ba := l.Stats()
	if ab.Delivered < 5 || ba.Delivered < 5 {
		t.Errorf("delivered %d one way and %d the other, want at least 5 each", ab.Delivered, ba.Delivered)
	}
}

// inNetns runs f on a thread inside the named namespace; sockets f opens
// stay there. The thread is retired afterwards (the goroutine ends locked).
func inNetns(t *testing.T, name string, f func()) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open("/run/netns/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			err = unix.Setns(fd, unix.CLONE_NEWNET)
			unix.Close(fd)
		}
		if err == nil {
			f()
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatalf("enter netns %s: %v", name, err)
	}
}

// waitUp waits until dev in namespace ns is operationally up.
func waitUp(t *testing.T, ns, dev string) {
	t.Helper()
	var out []byte
	for range 100 {
		var err error
		out, err = exec.Command("ip", "-n", ns, "-o", "link", "show", "dev", dev).Output()
		if err != nil {
			t.Fatalf("ip link show %s in %s: %v", dev, ns, err)
		}
		if strings.Contains(string(out), "state UP") {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s in %s never came up: %s", dev, ns, out)
}
