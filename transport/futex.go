//go:build linux

package transport

import (
	"math"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Futex operations without FUTEX_PRIVATE_FLAG: the word lives in a MAP_SHARED
// mapping that another process waits on, and a private futex is keyed by the
// caller's address space, so a wake from the peer would never reach it.
const (
	futexWait = 0
	futexWake = 1
)

// futexSleep sleeps while *w == val. It returns on a wake, a signal, or at
// once if *w != val; callers re-check their condition in every case.
//
// unix.Syscall6 (not RawSyscall) tells the scheduler the thread is blocked,
// so the P moves to another thread while this one sleeps in the kernel.
func futexSleep(w *atomic.Uint32, val uint32) {
	unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(w)), futexWait, uintptr(val), 0, 0, 0)
}

// futexWakeOne wakes at most one thread sleeping on w.
func futexWakeOne(w *atomic.Uint32) {
	unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(w)), futexWake, 1, 0, 0, 0)
}

// futexWakeAll wakes every thread sleeping on w.
func futexWakeAll(w *atomic.Uint32) {
	unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(w)), futexWake, math.MaxInt32, 0, 0, 0)
}
