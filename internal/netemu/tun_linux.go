package netemu

import (
	"fmt"
	"net"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// OpenTUN attaches to the existing TUN device name inside the network
// namespace at netnsPath (such as /run/netns/NAME, as `ip netns add`
// makes; "" means this process's own), without packet information, so
// reads and writes are bare IP packets. The returned file stays tied to
// that device whatever namespace later reads it. The device must exist: a
// missing one would otherwise be created quietly, unconfigured.
func OpenTUN(netnsPath, name string) (*os.File, error) {
	type result struct {
		f   *os.File
		err error
	}
	done := make(chan result, 1)
	// setns changes only the calling thread, so the work runs on a thread
	// of its own that is never handed back to the Go scheduler: the
	// goroutine ends still locked, and the runtime then retires the thread
	// rather than let other goroutines run in the wrong namespace.
	go func() {
		runtime.LockOSThread()
		f, err := openTUNHere(netnsPath, name)
		done <- result{f, err}
	}()
	r := <-done
	return r.f, r.err
}

func openTUNHere(netnsPath, name string) (*os.File, error) {
	if netnsPath != "" {
		ns, err := unix.Open(netnsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("open netns %s: %w", netnsPath, err)
		}
		err = unix.Setns(ns, unix.CLONE_NEWNET)
		unix.Close(ns)
		if err != nil {
			return nil, fmt.Errorf("enter netns %s: %w", netnsPath, err)
		}
	}
	if _, err := net.InterfaceByName(name); err != nil {
		return nil, fmt.Errorf("tun %s in %q: %w (create it first: ip tuntap add dev %s mode tun)", name, netnsPath, err, name)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %s: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("attach tun %s: %w", name, err)
	}
	// Non-blocking, so the file goes through Go's poller and Close ends a
	// pending Read.
	return os.NewFile(uintptr(fd), "tun:"+name), nil
}
