//go:build linux

package transport

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSpinnerBudget checks the rule that decides whether a wait spins:
// while recent waits were short, for at most twice their average plus
// 2 µs and never past spinLimit; not at all once waits are as long as a
// wake, misses included; and one long wait among short ones does not end
// it, while a run of idle waits does.
func TestSpinnerBudget(t *testing.T) {
	var s spinner
	if got := s.budget(); got <= 0 || got > 2*time.Microsecond {
		t.Fatalf("new ring: budget %v, want in (0, 2 µs]", got)
	}
	for range 32 {
		s.record(2 * time.Microsecond)
	}
	if got := s.budget(); got <= 0 || got > 6*time.Microsecond {
		t.Errorf("after 2 µs waits: budget %v, want in (0, 6 µs]", got)
	}
	for range 32 {
		s.record(25 * time.Microsecond)
	}
	if got := s.budget(); got != 0 {
		t.Errorf("after waits as long as a wake-up: budget %v, want 0", got)
	}
	for range 32 {
		s.record(time.Microsecond)
	}
	for range 8 { // spins that missed count as waits of spinLimit
		s.record(spinLimit)
	}
	if got := s.budget(); got != 0 {
		t.Errorf("after missed spins: budget %v, want 0", got)
	}
	for range 64 {
		s.record(time.Microsecond)
	}
	s.record(10 * time.Second) // one idle minute counts as one long wait
	if got := s.budget(); got <= 0 || got > spinLimit {
		t.Errorf("one long wait after short ones: budget %v, want in (0, %v]", got, spinLimit)
	}
	for range 8 {
		s.record(time.Second)
	}
	if got := s.budget(); got != 0 {
		t.Errorf("after idle waits: budget %v, want 0", got)
	}
}

// TestIdleRingDoesNotSpin runs back-to-back traffic over a ring pair, which
// arms both consumers' spin, then leaves the rings idle for a second with
// a consumer waiting on each, and reads the process's CPU time over that
// second. A consumer that kept polling would use most of a core; a bounded
// spin uses at most spinLimit once per consumer. The bound is generous,
// for the runtime's own background work on a loaded machine.
func TestIdleRingDoesNotSpin(t *testing.T) {
	seg, err := NewSegment(0)
	if err != nil {
		t.Fatal(err)
	}
	echoed := make(chan error, 1)
	go func() {
		buf := make([]byte, 0, 64)
		for {
			f, err := seg.recv(requestRing, buf)
			if err != nil {
				echoed <- closedIsEnd(err)
				return
			}
			buf = f.Payload
			if err := seg.send(responseRing, FrameToken, f.ID, f.Payload); err != nil {
				echoed <- closedIsEnd(err)
				return
			}
		}
	}()
	defer func() {
		seg.shut()
		if err := <-echoed; err != nil {
			t.Errorf("echo: %v", err)
		}
		seg.Close()
	}()
	const exchanges = 5000
	payload := pattern(1, 64)
	buf := make([]byte, 0, 64)
	for range exchanges {
		if err := seg.send(requestRing, FrameToken, 1, payload); err != nil {
			t.Fatal(err)
		}
		f, err := seg.recv(responseRing, buf)
		if err != nil {
			t.Fatal(err)
		}
		buf = f.Payload
	}
	t.Logf("%d exchanges, %d of the waits ended by a spin", exchanges, seg.Stats().Spins)

	// A consumer waits on each ring: the echo goroutine on requests, and
	// this one on responses.
	idle := make(chan error, 1)
	go func() {
		_, err := seg.recv(responseRing, nil)
		idle <- err
	}()
	before := cpuTime(t)
	time.Sleep(time.Second)
	used := cpuTime(t) - before
	t.Logf("process CPU over an idle second: %v", used)
	if used > 100*time.Millisecond {
		t.Errorf("process used %v of CPU over an idle second with its rings' consumers waiting; want at most 100ms", used)
	}
	seg.shut()
	if err := <-idle; err == nil {
		t.Error("idle consumer got a frame nobody sent")
	}
}

// cpuTime is the user and system CPU time the process has used.
func cpuTime(t *testing.T) time.Duration {
	t.Helper()
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
