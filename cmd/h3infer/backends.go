package main

import (
	"context"
	"errors"

	"h3infer/gateway"
	"h3infer/infer"
	"h3infer/scheduler"
	"h3infer/tokenizers"
	"h3infer/upstream"
	"h3infer/workerpool"
)

// The backends the scheduler dispatches to, and the catalog of the models
// they serve that the gateway lists. Each kind of backend is one
// backendKind in the list backends builds; today there is one, the local
// worker processes. A new kind is its own package, one more entry in that
// list, and its section of the config file: the gateway, the scheduler
// and the transport do not change. The scheduler asks each kind which of
// its backends serve a request's model.

// backends lists the kinds of backend serve dispatches to: the local
// worker processes, and each further kind the config file sets up, built
// here from its section of cfg.
func backends(local localWorkers, remote *upstream.Set) backendKinds {
	return backendKinds{local, upstreams{remote}}
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

func (ks backendKinds) Backends(model string) []scheduler.Backend {
	var out []scheduler.Backend
	for _, k := range ks {
		out = append(out, k.Backends(model)...)
	}
	return out
}

// Models lists each model once: a model several kinds serve is listed as
// the first kind describes it.
func (ks backendKinds) Models() []infer.ModelInfo {
	var out []infer.ModelInfo
	seen := map[string]bool{}
	for _, k := range ks {
		for _, m := range k.Models() {
			if !seen[m.Name] {
				seen[m.Name] = true
				out = append(out, m)
			}
		}
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

// BackendStates joins each kind's states, each under its own key.
func (ks backendKinds) BackendStates() map[string]any {
	states := map[string]any{}
	for _, k := range ks {
		for key, s := range k.BackendStates() {
			states[key] = s
		}
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

// Backends lists every worker process for a version the registry has
// loaded (every process loads every model), and none for another model.
func (l localWorkers) Backends(model string) []scheduler.Backend {
	if !l.Serves(model) {
		return nil
	}
	ps := l.pool.Processes()
	out := make([]scheduler.Backend, len(ps))
	for i, p := range ps {
		out[i] = p
	}
	return out
}

func (l localWorkers) BackendStates() map[string]any {
	return map[string]any{"workers": l.pool.Status()}
}

// upstreams is the remote servers of the config file's upstreams section.
type upstreams struct{ *upstream.Set }

func (u upstreams) BackendStates() map[string]any {
	return map[string]any{"upstreams": u.Set.BackendStates()}
}

// firstUpstreamID numbers the upstreams' backends in logs and traces
// apart from the worker processes', which count from 0 (at most 64).
const firstUpstreamID = 1000

// router routes a request for a model of the registry's to one of its
// versions (workers serve NAME@VERSION); a model only other kinds serve
// keeps its name, and has no versions to pin.
type router struct{ reg *workerpool.Registry }

func (r router) Route(model, key, pin string) (target, ver string, done func(failed bool), err error) {
	if pin != "" || r.reg.Has(model) {
		return r.reg.Route(model, key, pin)
	}
	return model, "", func(bool) {}, nil
}

// tokenizerSource gives /tokenize the tokenizer of the version a
// completion would be routed to (router's choice, made again without
// routing a request), read from that version's directory. A model only
// other kinds serve has no tokenizer here: its upstream tokenizes, and a
// count from anything else could be wrong.
type tokenizerSource struct {
	reg   *workerpool.Registry
	cache *tokenizers.Cache
}

func (s tokenizerSource) Tokenizer(ctx context.Context, model, key, pin string) (gateway.Tokenizer, string, error) {
	if pin == "" && !s.reg.Has(model) {
		return nil, "", &gateway.NoTokenizerError{Model: model, Reason: "is served by an upstream"}
	}
	ver, dir, err := s.reg.Resolve(model, key, pin)
	if err != nil {
		return nil, "", err
	}
	m, err := s.cache.Get(ctx, dir)
	if errors.Is(err, tokenizers.ErrSynthetic) {
		return nil, "", &gateway.NoTokenizerError{Model: model, Reason: "is the synthetic model, which has no tokenizer"}
	}
	if err != nil {
		return nil, "", err
	}
	return m, ver, nil
}

var (
	_ gateway.Tokenizers   = tokenizerSource{}
	_ gateway.Tokenizer    = (*tokenizers.Model)(nil)
	_ gateway.Router       = router{}
	_ scheduler.BackendSet = backendKinds{}
	_ gateway.Catalog      = backendKinds{}
	_ backendKind          = localWorkers{}
	_ backendKind          = upstreams{}
	_ scheduler.Backend    = (*workerpool.Process)(nil)
	// A local worker's events reach the gateway with no goroutine between.
	_ scheduler.SinkBackend = (*workerpool.Process)(nil)
)
