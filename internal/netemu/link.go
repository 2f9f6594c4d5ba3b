package netemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"
)

// Config configures both directions of a Link.
type Config struct {
	AToB, BToA Direction
}

// Link moves packets between two endpoints, A and B, through one pipe per
// direction. An endpoint's reads yield whole packets and its writes take
// whole packets, as a TUN device's do.
type Link struct {
	a, b   io.ReadWriteCloser
	ab, ba *direction
	log    *slog.Logger
}

// direction is a pipe with the lock and wake-up its two goroutines share.
type direction struct {
	name string
	mu   sync.Mutex
	p    *pipe
	// wake tells the writer a packet arrived, which may be due earlier
	// than the one it sleeps for (with jitter).
	wake chan struct{}
}

// New checks cfg. The Link owns a and b from here on: Run closes them.
func New(a, b io.ReadWriteCloser, cfg Config, log *slog.Logger) (*Link, error) {
	var errs []error
	if err := cfg.AToB.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("a_to_b: %w", err))
	}
	if err := cfg.BToA.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("b_to_a: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return &Link{
		a: a, b: b, log: log,
		ab: &direction{name: "a_to_b", p: newPipe(cfg.AToB), wake: make(chan struct{}, 1)},
		ba: &direction{name: "b_to_a", p: newPipe(cfg.BToA), wake: make(chan struct{}, 1)},
	}, nil
}

// Run moves packets until ctx ends or an endpoint fails, then closes both
// endpoints, waits for its goroutines and returns the failure, if any.
// Packets still held when it returns are dropped.
func (l *Link) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	for _, d := range []struct {
		src, dst io.ReadWriter
		dir      *direction
	}{{l.a, l.b, l.ab}, {l.b, l.a, l.ba}} {
		wg.Go(func() {
			if err := d.dir.read(ctx, d.src); err != nil {
				cancel(fmt.Errorf("%s: read: %w", d.dir.name, err))
			}
		})
		wg.Go(func() { d.dir.write(ctx, d.dst, l.log) })
	}
	<-ctx.Done()
	// Closing is what ends a read blocked on a device.
	errA, errB := l.a.Close(), l.b.Close()
	wg.Wait()
	if err := context.Cause(ctx); !errors.Is(err, context.Canceled) && err != nil {
		return err
	}
	return errors.Join(errA, errB)
}

// Stats returns what each direction has done so far.
func (l *Link) Stats() (aToB, bToA Stats) {
	return l.ab.stats(), l.ba.stats()
}

func (d *direction) stats() Stats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.p.stats
}

// maxPacket is the largest IP packet a read can return.
const maxPacket = 65535

func (d *direction) read(ctx context.Context, src io.Reader) error {
	buf := make([]byte, maxPacket)
	for {
		n, err := src.Read(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil // closed by Run
			}
			return err
		}
		if n == 0 {
			continue
		}
		pkt := make([]byte, n)
		copy(pkt, buf[:n])
		d.mu.Lock()
		v := d.p.push(pkt, time.Now())
		d.mu.Unlock()
		if v == queued {
			select {
			case d.wake <- struct{}{}:
			default:
			}
		}
	}
}

// write releases packets when they fall due.
func (d *direction) write(ctx context.Context, dst io.Writer, log *slog.Logger) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		d.mu.Lock()
		var due [][]byte
		now := time.Now()
		for {
			pkt, ok := d.p.pop(now)
			if !ok {
				break
			}
			due = append(due, pkt)
		}
		next, pending := d.p.next()
		d.mu.Unlock()

		for _, pkt := range due {
			_, err := dst.Write(pkt)
			d.mu.Lock()
			if err != nil {
				d.p.stats.WriteErrs++
			} else {
				d.p.stats.Delivered++
			}
			d.mu.Unlock()
			if err != nil && ctx.Err() == nil {
				// A device that is down refuses packets, as a cable
				// unplugged would drop them; say so and go on.
				log.Debug("netemu write", "direction", d.name, "err", err)
			}
		}
		var fire <-chan time.Time
		if pending {
			timer.Reset(time.Until(next))
			fire = timer.C
		}
		select {
		case <-ctx.Done():
			return
		case <-d.wake:
		case <-fire:
		}
	}
}
