package netemu

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// chanDevice stands in for a TUN device: what the test sends into in is
// what the link reads, and what the link writes comes out of out.
type chanDevice struct {
	in, out   chan []byte
	closed    chan struct{}
	closeOnce sync.Once
}

func newChanDevice() *chanDevice {
	return &chanDevice{in: make(chan []byte, 64), out: make(chan []byte, 64), closed: make(chan struct{})}
}

func (d *chanDevice) Read(p []byte) (int, error) {
	select {
	case pkt := <-d.in:
		return copy(p, pkt), nil
	case <-d.closed:
		return 0, io.ErrClosedPipe
	}
}

func (d *chanDevice) Write(p []byte) (int, error) {
	select {
	case d.out <- append([]byte(nil), p...):
		return len(p), nil
	case <-d.closed:
		return 0, io.ErrClosedPipe
	}
}

func (d *chanDevice) Close() error {
	d.closeOnce.Do(func() { close(d.closed) })
	return nil
}

func TestLinkForwardsBothWaysAfterDelay(t *testing.T) {
	const delay = 20 * time.Millisecond
	a, b := newChanDevice(), newChanDevice()
	l, err := New(a, b, Config{
		AToB: Direction{Delay: delay, Seed: 1},
		BToA: Direction{Delay: delay, Loss: 1, Seed: 2}, // B's packets never arrive
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- l.Run(ctx) }()

	for i := range 5 {
		sent := time.Now()
		a.in <- []byte{byte(i)}
		b.in <- []byte{byte(i)}
		select {
		case pkt := <-b.out:
			// A lower bound only: the link may be late on a loaded
			// machine, never early.
			if held := time.Since(sent); held < delay {
				t.Errorf("packet %d arrived after %s, before the %s delay", i, held, delay)
			}
			if pkt[0] != byte(i) {
				t.Errorf("got packet %d, want %d", pkt[0], i)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("packet %d never arrived", i)
		}
	}
	cancel()
	select {
	case err := <-runErr:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	select {
	case pkt := <-a.out:
		t.Errorf("a packet from B crossed a link with 100%% loss: %v", pkt)
	default:
	}
	ab, ba := l.Stats()
	if ab.Received != 5 || ab.Delivered != 5 || ab.Lost != 0 {
		t.Errorf("a_to_b stats %+v, want 5 received and delivered", ab)
	}
	if ba.Received != 5 || ba.Lost != 5 || ba.Delivered != 0 {
		t.Errorf("b_to_a stats %+v, want 5 received and lost", ba)
	}
}

// failingDevice fails its reads, as a device deleted under the link would.
type failingDevice struct{ chanDevice }

func (*failingDevice) Read([]byte) (int, error) { return 0, errors.New("device gone") }

func TestLinkStopsOnReadError(t *testing.T) {
	a := &failingDevice{*newChanDevice()}
	b := newChanDevice()
	l, err := New(a, b, Config{}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- l.Run(context.Background()) }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Run returned nil after a read failed")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not stop after a read failed")
	}
	select {
	case <-b.closed:
	default:
		t.Error("the other device was left open")
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	_, err := New(newChanDevice(), newChanDevice(), Config{AToB: Direction{Loss: 2}, BToA: Direction{Delay: -1}}, slog.New(slog.DiscardHandler))
	if err == nil {
		t.Fatal("no error")
	}
	for _, key := range []string{"a_to_b: loss", "b_to_a: delay"} {
		if !strings.Contains(err.Error(), key) {
			t.Errorf("error %q does not name %s", err, key)
		}
	}
}

func TestLinkPacesAtRate(t *testing.T) {
	// 1,000 bytes at 800 kbit/s are 10 ms on the wire, so ten packets
	// sent at once take 100 ms to cross.
	const n, each = 10, 10 * time.Millisecond
	a, b := newChanDevice(), newChanDevice()
	l, err := New(a, b, Config{AToB: Direction{Rate: 800_000}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	runLink(t, l)

	sent := time.Now()
	for range n {
		a.in <- make([]byte, 1000)
	}
	for i := range n {
		select {
		case <-b.out:
			// Lower bounds only, as above.
			if held, want := time.Since(sent), time.Duration(i+1)*each; held < want {
				t.Errorf("packet %d arrived after %s, before its %s on the wire", i, held, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("packet %d never arrived", i)
		}
	}
}

// runLink runs l until the test ends, and fails the test if Run does.
// The cleanup is registered last, so it runs before those registered
// earlier (the endpoints' and namespaces' own).
func runLink(t *testing.T, l *Link) {
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- l.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-runErr; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}
