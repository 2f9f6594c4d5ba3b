package workerpool

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"h3infer/infer"
	"h3infer/transport"
	"h3infer/workerconf"
)

// controlIDBase marks the ids of control requests, keeping them apart from
// the scheduler's request ids, which count up from 1.
const controlIDBase = 1 << 63

// LoadModel loads spec in every worker beside the models they serve and
// returns once all of them have loaded, warmed up and checked it; only then
// do requests for spec.Name reach a worker. If any worker refuses it, the
// others drop it again and the error says why; the models served before
// are untouched. A worker that is restarting meanwhile loads it when it
// starts. Requests keep flowing throughout.
func (p *Pool) LoadModel(ctx context.Context, spec workerconf.Model) error {
	if spec.Name == "" || spec.Dir == "" {
		return fmt.Errorf("pool: load model: name and dir are required, got %q %q", spec.Name, spec.Dir)
	}
	// Refusing a bad model.json here saves every worker the attempt.
	cfg, err := workerconf.ReadModelConfig(spec.Dir)
	if err != nil {
		return fmt.Errorf("load model %s from %s: %w", spec.Name, spec.Dir, err)
	}
	info := infer.ModelInfo{Name: spec.Name, ContextLength: uint32(cfg.ContextLength),
		Encoder: cfg.IsEncoder(), EmbeddingSize: uint32(cfg.HiddenSize), Matryoshka: cfg.Matryoshka}

	p.controlMu.Lock()
	defer p.controlMu.Unlock()
	p.mu.Lock()
	if slices.ContainsFunc(p.models, func(m workerconf.Model) bool { return m.Name == spec.Name }) {
		p.mu.Unlock()
		return fmt.Errorf("load model %s: already loaded", spec.Name)
	}
	p.models = append(p.models, spec)
	p.mu.Unlock()

	var (
		mu     sync.Mutex
		loaded []*Process
		errs   []error
		wg     sync.WaitGroup
	)
	for _, w := range p.workers {
		wg.Go(func() {
			err := p.control(ctx, w, &transport.Control{Op: transport.ControlLoad, Name: spec.Name, Dir: spec.Dir})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case errors.Is(err, ErrNotReady):
				// It loads the model from its settings when it starts.
			case err != nil:
				errs = append(errs, fmt.Errorf("worker %d: %w", w.id, err))
			default:
				loaded = append(loaded, w)
			}
		})
	}
	wg.Wait()
	if len(errs) == 0 {
		for _, w := range loaded {
			w.mu.Lock()
			w.models = append(w.models, info)
			w.mu.Unlock()
		}
		p.notify()
		return nil
	}
	p.mu.Lock()
	p.models = slices.DeleteFunc(p.models, func(m workerconf.Model) bool { return m.Name == spec.Name })
	p.mu.Unlock()
	for _, w := range loaded {
		if err := p.control(context.WithoutCancel(ctx), w, &transport.Control{Op: transport.ControlUnload, Name: spec.Name}); err != nil && !errors.Is(err, ErrNotReady) {
			p.log.Warn("undo load", "worker", w.id, "model", spec.Name, "err", err)
		}
	}
	return fmt.Errorf("load model %s from %s: %w", spec.Name, spec.Dir, errors.Join(errs...))
}

// UnloadModel stops every worker serving name. Sequences already running
// on it finish; requests sent afterwards fail with model_not_found, so the
// caller must have stopped routing to it and let its requests drain first.
func (p *Pool) UnloadModel(ctx context.Context, name string) error {
	p.controlMu.Lock()
	defer p.controlMu.Unlock()
	p.mu.Lock()
	n := len(p.models)
	p.models = slices.DeleteFunc(p.models, func(m workerconf.Model) bool { return m.Name == name })
	found := len(p.models) != n
	p.mu.Unlock()
	if !found {
		return fmt.Errorf("unload model %s: not loaded", name)
	}
	var errs []error
	for _, w := range p.workers {
		w.mu.Lock()
		w.models = slices.DeleteFunc(w.models, func(m infer.ModelInfo) bool { return m.Name == name })
		w.mu.Unlock()
		err := p.control(ctx, w, &transport.Control{Op: transport.ControlUnload, Name: name})
		if err != nil && !errors.Is(err, ErrNotReady) {
			errs = append(errs, fmt.Errorf("worker %d: %w", w.id, err))
		}
	}
	p.notify()
	if len(errs) > 0 {
		return fmt.Errorf("unload model %s: %w", name, errors.Join(errs...))
	}
	return nil
}

// control sends c to w and waits for its answer. The caller holds
// controlMu.
func (p *Pool) control(ctx context.Context, w *Process, c *transport.Control) error {
	w.mu.Lock()
	end, ready := w.end, w.ready
	w.mu.Unlock()
	if !ready || end == nil {
		return ErrNotReady
	}
	p.controlSeq++
	call, err := end.Control(controlIDBase|p.controlSeq, c)
	if err != nil {
		return err
	}
	select {
	case ev, ok := <-call.Events():
		switch {
		case !ok:
			return errors.New("worker ended the control request without an answer")
		case ev.Err != nil:
			return fmt.Errorf("%s", ev.Err.Message)
		case ev.Done == nil:
			call.Cancel()
			return errors.New("worker answered a control request with a token")
		}
		return nil
	case <-ctx.Done():
		// The worker still finishes what it started; an unwanted load is
		// undone by the caller.
		call.Cancel()
		return ctx.Err()
	}
}
