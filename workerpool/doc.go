// Package workerpool is the gateway process's side of the workers: the
// Pool starts the worker processes, each with its own shared-memory ring,
// hands each its settings, watches their heartbeats and rings, restarts
// them when they exit and exports their counters; a Process is the stable
// handle the scheduler dispatches requests to; the Registry knows the
// versions of every model, routes requests between them (primary, canary,
// rollback) and has the pool load and unload them.
//
// It runs no model: it must not import the worker process's packages
// (engine, ort, tokenize), nor anything that links ONNX Runtime, nor the
// gateway. What it tells a worker is workerconf's.
package workerpool
