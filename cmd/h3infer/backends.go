package main

import (
	"h3infer/gateway"
	"h3infer/infer"
	"h3infer/scheduler"
	"h3infer/workerpool"
)

// The backends the scheduler dispatches to, and the catalog of the models
// they serve that the gateway lists. Each kind of backend is one
// backendKind in the list backends builds; today there is one, the local
// worker processes. A new kind is its own package, one more entry in that
// list, and its section of the config file: the gateway, the scheduler
// and the transport do not change. (The scheduler sends any request to
// any backend with a free slot, so a kind must serve the models the
// others serve until dispatch learns which backend serves which model.)

// backends lists the kinds of backend serve dispatches to: the local
// worker processes, and each further kind the config file sets up, built
// here from its section of cfg.
func backends(cfg Config, local localWorkers) backendKinds {
	return backendKinds{local}
}

// backendKind is one kind of backend as the command wires it: the
// backends the scheduler may dispatch to, and its part of the catalog.
type backendKind interface {
	scheduler.BackendSet
	gateway.Catalog
}

// backendKinds joins the kinds: the scheduler sees the backends of all of
// them, the gateway the models of all of them.
type backendKinds []backendKind

func (ks backendKinds) Backends() []scheduler.Backend {
	var out []scheduler.Backend
	for _, k := range ks {
		out = append(out, k.Backends()...)
	}
	return out
}

func (ks backendKinds) Models() []infer.ModelInfo {
	var out []infer.ModelInfo
	for _, k := range ks {
		out = append(out, k.Models()...)
	}
	return out
}

// Ready reports whether every kind is ready to serve.
func (ks backendKinds) Ready() bool {
	for _, k := range ks {
		if !k.Ready() {
			return false
		}
	}
	return true
}

// BackendStates is the one kind's state as it shows it, or each kind's
// in turn.
func (ks backendKinds) BackendStates() any {
	if len(ks) == 1 {
		return ks[0].BackendStates()
	}
	states := make([]any, len(ks))
	for i, k := range ks {
		states[i] = k.BackendStates()
	}
	return states
}

// localWorkers is the worker processes on this machine: the pool's
// processes are the backends, the registry says which models (and
// versions) they serve, and the pool how each process is doing.
type localWorkers struct {
	*workerpool.Registry
	pool *workerpool.Pool
}

func (l localWorkers) Backends() []scheduler.Backend {
	ps := l.pool.Processes()
	out := make([]scheduler.Backend, len(ps))
	for i, p := range ps {
		out[i] = p
	}
	return out
}

func (l localWorkers) BackendStates() any { return l.pool.Status() }

var (
	_ scheduler.BackendSet = backendKinds{}
	_ gateway.Catalog      = backendKinds{}
	_ backendKind          = localWorkers{}
	_ scheduler.Backend    = (*workerpool.Process)(nil)
)
