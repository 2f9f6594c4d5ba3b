package engine

import (
	"fmt"
	"runtime"
	"syscall"
)

// Where a worker shares its CPUs with the gateway and with other workers,
// the operating system decides whose work runs next. With a nice value set
// (workerconf.Settings.Nice), the worker runs bulk work, the decode steps of
// batches that hold no urgent sequence and the prefills of requests that
// are not urgent, on a bulk lane: one thread whose nice value is raised.
// The loop's own thread keeps the process's priority and, while the lane
// computes a bulk step, prefills urgent requests that arrive and sends
// their first token (workerLoop.aside). So an urgent request neither waits
// for the bulk step in flight nor runs at bulk priority, and on contended
// CPUs the gateway's threads run ahead of bulk compute.
//
// Linux keeps a nice value per thread. A thread the Go runtime creates
// later is cloned from an unlocked thread or from its template thread,
// never from a thread locked with LockOSThread, so raising the nice of the
// lane's locked thread changes no other thread, now or later.

// lane runs functions one at a time on an OS thread of its own.
type lane struct {
	work chan func()
	done chan struct{} // one send per function run, then closed at exit
}

// newLane starts a lane whose thread has the nice value nice. close stops
// it and waits for its goroutine.
func newLane(nice int) (*lane, error) {
	l := &lane{work: make(chan func()), done: make(chan struct{})}
	ready := make(chan error, 1)
	go func() {
		defer close(l.done)
		// Never unlocked: the thread ends with the goroutine rather than
		// serving other goroutines at its raised nice.
		runtime.LockOSThread()
		tid := syscall.Gettid()
		if err := syscall.Setpriority(syscall.PRIO_PROCESS, tid, nice); err != nil {
			ready <- fmt.Errorf("nice %d: thread %d: %w", nice, tid, err)
			return
		}
		ready <- nil
		for f := range l.work {
			f()
			l.done <- struct{}{}
		}
	}()
	if err := <-ready; err != nil {
		<-l.done
		return nil, err
	}
	return l, nil
}

// run calls f on the lane and returns when it has returned.
func (l *lane) run(f func()) {
	l.work <- f
	<-l.done
}

// close stops the lane and waits for its goroutine to end.
func (l *lane) close() {
	close(l.work)
	<-l.done
}
