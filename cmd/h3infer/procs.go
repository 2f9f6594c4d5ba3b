package main

import (
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
)

// defaultGCPercent is gateway.gc_percent's default. It collects less
// often than Go's (400 rather than 100): under load the gateway allocates
// per token (events, SSE bytes), and with GOGC 100 the collections'
// assists and background marking took CPU from the goroutines serving an
// urgent request's first token at the worst moments: they lengthened the
// loaded tail of an urgent request's time to first token (`go test -bench
// PriorityIsolation ./cmd/h3infer/`; the figures are in
// docs/BENCHMARKS.md, "Urgency"). The cost is a larger heap between
// collections; memory_limit_bytes bounds it where that matters.
const defaultGCPercent = 400

// The range gateway.gc_percent accepts.
const (
	minGCPercent = 25
	maxGCPercent = 10000
)

// setGC applies the gateway's garbage-collection settings unless the
// environment sets them (GOGC, GOMEMLIMIT).
func setGC(cfg GatewayConfig, log *slog.Logger) {
	if env := os.Getenv("GOGC"); env != "" {
		log.Info("gateway.gc_percent not applied: GOGC is set", "GOGC", env)
	} else {
		debug.SetGCPercent(cfg.GCPercent)
	}
	if cfg.MemoryLimitBytes <= 0 {
		return
	}
	if env := os.Getenv("GOMEMLIMIT"); env != "" {
		log.Info("gateway.memory_limit_bytes not applied: GOMEMLIMIT is set", "GOMEMLIMIT", env)
		return
	}
	debug.SetMemoryLimit(cfg.MemoryLimitBytes)
}

// addProcs raises GOMAXPROCS by n, one for each goroutine of the process
// that spends most of its life asleep in a futex wait or busy in a long cgo
// call: the ring receivers (transport.GatewayEnd.Run in the gateway, one
// per worker; the worker's receive loop) and a worker's bulk lane
// (engine, nice.go).
//
// A thread blocked in a system call or a cgo call keeps its P until the
// runtime's monitor thread takes it back, and that monitor polls less and
// less often (down to every 10 ms) while it finds nothing to take. With
// GOMAXPROCS at the CPU count, sleeping receivers could hold every P: a
// goroutine they had just woken (a handler waiting for its first token, the
// worker's loop waiting for a submit) and the network poller (a new request)
// then waited for the monitor. Measured with `go test -bench
// PriorityIsolation ./cmd/h3infer/` (docs/BENCHMARKS.md, "Urgency"), that
// wait was most of the loaded tail of an urgent request's time to first
// token. The extra Ps do not add CPU work: they only let runnable
// goroutines run while those threads sleep.
//
// GOMAXPROCS set in the environment is the base it adds to.
func addProcs(n int) {
	if n > 0 {
		runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + n)
	}
}
