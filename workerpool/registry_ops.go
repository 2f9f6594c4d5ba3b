package workerpool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"h3infer/workerconf"
)

// LoadVersion loads version ver of model into the workers without routing
// anything to it; a model seen for the first time gets it as its primary.
// A version that fails to load or to pass its checks is refused, recorded
// in the status, and changes nothing.
func (r *Registry) LoadVersion(ctx context.Context, model, ver string) error {
	r.opMu.Lock()
	defer r.opMu.Unlock()
	_, err := r.load(ctx, model, ver)
	return err
}

// load does LoadVersion's work; opMu held.
func (r *Registry) load(ctx context.Context, model, ver string) (*version, error) {
	r.mu.Lock()
	f := r.models[model]
	if f != nil {
		if v := f.versions[ver]; v != nil && !v.retired {
			r.mu.Unlock()
			return v, nil
		}
		if f.static {
			r.mu.Unlock()
			return nil, conflict("model %q comes from the models config key and has no other versions", model)
		}
	}
	r.mu.Unlock()
	if r.cfg.Root == "" {
		return nil, conflict("no model repository is configured")
	}
	if n, err := strconv.ParseUint(ver, 10, 32); err != nil || n == 0 || strconv.FormatUint(n, 10) != ver {
		return nil, notFound("version %q: versions are positive integers", ver)
	}
	if !validName(model) {
		return nil, notFound("model %q does not exist", model)
	}
	dir := filepath.Join(r.cfg.Root, model, ver)
	sig, complete := versionSignature(dir)
	if !complete {
		if _, err := os.Stat(dir); err != nil {
			return nil, notFound("model %q version %s: no directory %s", model, ver, dir)
		}
		return nil, conflict("model %q version %s: %s must hold %s, %s and %s", model, ver, dir, workerconf.ModelConfigFile, workerconf.TokenizerFile, workerconf.ModelFile)
	}
	// opMu keeps the versions loaded from changing but for retirements
	// ending, which only free memory.
	r.mu.Lock()
	err := r.checkMemory(dir)
	r.mu.Unlock()
	if err == nil {
		err = r.loader.LoadModel(ctx, workerconf.Model{Name: Target(model, ver), Dir: dir})
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	f = r.models[model]
	if f == nil {
		f = &family{name: model, versions: map[string]*version{}, failed: map[string]string{}, seen: map[string]string{}, tried: map[string]string{}}
	}
	if err != nil {
		f.failed[ver] = err.Error()
		f.tried[ver] = sig
		r.models[model] = f
		r.log.Error("model version refused", "model", model, "version", ver, "err", err)
		return nil, conflict("model %q version %s refused: %v", model, ver, err)
	}
	delete(f.failed, ver)
	v := &version{model: model, ver: ver, target: Target(model, ver), dir: dir, drained: make(chan struct{}), gone: make(chan struct{})}
	f.versions[ver] = v
	if f.primary == "" {
		f.primary = ver
	}
	r.models[model] = f
	r.setWeights(f)
	r.log.Info("model version loaded", "model", model, "version", ver, "dir", dir)
	return v, nil
}

// validName keeps a model name to one path element.
func validName(s string) bool {
	return s != "" && s != "." && s != ".." && filepath.Base(s) == s && s[0] != '.'
}

// Promote makes ver the version every request goes to, loading it first
// if needed. Requests already running stay on the version they began on.
// The old primary stays loaded as the rollback target; the version that
// held that place before is retired.
func (r *Registry) Promote(ctx context.Context, model, ver string) error {
	r.opMu.Lock()
	defer r.opMu.Unlock()
	if _, err := r.load(ctx, model, ver); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	f := r.models[model]
	if f.primary == ver {
		if f.canary == ver {
			f.canary, f.weight = "", 0
		}
		r.setWeights(f)
		return nil
	}
	old := f.primary
	f.primary = ver
	if f.canary == ver {
		f.canary, f.weight = "", 0
	}
	if f.previous != "" && f.previous != ver && f.previous != f.canary {
		r.retire(f, f.previous)
	}
	f.previous = old
	r.setWeights(f)
	r.log.Info("model version promoted", "model", model, "version", ver, "previous", old)
	return nil
}

// Canary sends percent (0 < percent <= 100) of model's requests to ver,
// loading it first if needed; the split is sticky per routing key. A
// percent of 0 ends the canary.
func (r *Registry) Canary(ctx context.Context, model, ver string, percent float64) error {
	if !(percent >= 0 && percent <= 100) {
		return conflict("canary percent: must be between 0 and 100, got %v", percent)
	}
	r.opMu.Lock()
	defer r.opMu.Unlock()
	if percent == 0 {
		return r.endCanary(model)
	}
	if _, err := r.load(ctx, model, ver); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	f := r.models[model]
	if f.primary == ver {
		return conflict("model %q version %s is already the primary", model, ver)
	}
	if f.canary != "" && f.canary != ver && f.canary != f.previous {
		r.retire(f, f.canary)
	}
	f.canary, f.weight = ver, percent/100
	r.setWeights(f)
	r.log.Info("model canary set", "model", model, "version", ver, "percent", percent)
	return nil
}

// endCanary stops routing to the canary and retires it; opMu held.
func (r *Registry) endCanary(model string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	f := r.models[model]
	if f == nil {
		return notFound("model %q does not exist", model)
	}
	if f.canary == "" {
		return conflict("model %q has no canary", model)
	}
	c := f.canary
	f.canary, f.weight = "", 0
	if c != f.previous {
		r.retire(f, c)
	}
	r.setWeights(f)
	r.log.Info("model canary ended", "model", model, "version", c)
	return nil
}

// Rollback undoes the last change to model's routing: it ends a canary if
// one runs, else it swaps the primary with the previous version, which is
// still loaded, so it takes effect at once.
func (r *Registry) Rollback(ctx context.Context, model string) error {
	r.opMu.Lock()
	defer r.opMu.Unlock()
	r.mu.Lock()
	f := r.models[model]
	if f == nil {
		r.mu.Unlock()
		return notFound("model %q does not exist", model)
	}
	if f.canary != "" {
		r.mu.Unlock()
		return r.endCanary(model)
	}
	defer r.mu.Unlock()
	if f.previous == "" {
		return conflict("model %q has no previous version to roll back to", model)
	}
	f.primary, f.previous = f.previous, f.primary
	r.setWeights(f)
	r.log.Info("model rolled back", "model", model, "version", f.primary, "from", f.previous)
	return nil
}

// UnloadVersion takes ver out of the workers once its requests have
// ended. The primary cannot be unloaded; a canary or the rollback target
// can.
func (r *Registry) UnloadVersion(ctx context.Context, model, ver string) error {
	r.opMu.Lock()
	defer r.opMu.Unlock()
	r.mu.Lock()
	f := r.models[model]
	if f == nil || f.versions[ver] == nil || f.versions[ver].retired {
		r.mu.Unlock()
		return notFound("model %q has no loaded version %q", model, ver)
	}
	if f.primary == ver {
		r.mu.Unlock()
		return conflict("model %q version %s is the primary; promote another version first", model, ver)
	}
	if f.canary == ver {
		f.canary, f.weight = "", 0
	}
	if f.previous == ver {
		f.previous = ""
	}
	v := f.versions[ver]
	r.retire(f, ver)
	r.setWeights(f)
	r.mu.Unlock()
	select {
	case <-v.gone:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("unload model %q version %s: still draining: %w", model, ver, ctx.Err())
	}
}

// retire stops routing to ver and, in a goroutine the registry owns,
// unloads it once its last request has ended (or DrainTimeout passed);
// r.mu held.
func (r *Registry) retire(f *family, ver string) {
	v := f.versions[ver]
	if v == nil || v.retired {
		return
	}
	v.retired = true
	if v.inflight == 0 {
		close(v.drained)
	}
	drain := r.cfg.DrainTimeout // r.mu held; SetPolicy changes it under r.mu
	r.wg.Go(func() {
		defer close(v.gone)
		timer := time.NewTimer(drain)
		defer timer.Stop()
		select {
		case <-v.drained:
		case <-timer.C:
			r.log.Warn("model version still has requests after the drain timeout; unloading it anyway", "model", v.model, "version", v.ver)
		case <-r.closing:
			return
		}
		// Unloading must finish even if the registry is closing meanwhile:
		// the pool is closed after the registry.
		if err := r.loader.UnloadModel(context.Background(), v.target); err != nil {
			r.log.Warn("unload model version", "model", v.model, "version", v.ver, "err", err)
		}
		r.mu.Lock()
		if f.versions[v.ver] == v {
			delete(f.versions, v.ver)
		}
		r.requests.DeletePartialMatch(map[string]string{"model": v.model, "version": v.ver})
		r.inflight.DeleteLabelValues(v.model, v.ver)
		r.role.DeleteLabelValues(v.model, v.ver)
		r.mu.Unlock()
		r.log.Info("model version unloaded", "model", v.model, "version", v.ver)
	})
}

// Watch reads the repository every Poll until ctx ends: a new model is
// loaded, and with AutoPromote a new, higher version replaces the primary.
// A version is acted on once two reads in a row find its files unchanged,
// so that one still being copied in is not loaded half-written.
func (r *Registry) Watch(ctx context.Context) {
	if r.cfg.Root == "" {
		return
	}
	r.mu.Lock()
	every := r.cfg.Poll
	r.mu.Unlock()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.closing:
			return
		case <-r.pollChanged:
			r.mu.Lock()
			every = r.cfg.Poll
			r.mu.Unlock()
			t.Reset(every)
			continue
		case <-t.C:
		}
		if err := r.poll(ctx); err != nil {
			r.log.Warn("model repository", "err", err)
		}
	}
}

func (r *Registry) poll(ctx context.Context) error {
	repo, err := scanRepository(r.cfg.Root)
	if err != nil {
		return err
	}
	var errs []error
	for _, name := range sortedKeys(repo) {
		vers := repo[name]
		if len(vers) == 0 {
			continue
		}
		top := vers[len(vers)-1]
		r.mu.Lock()
		f := r.models[name]
		if f == nil {
			f = &family{name: name, versions: map[string]*version{}, failed: map[string]string{}, seen: map[string]string{}, tried: map[string]string{}}
			r.models[name] = f
		}
		stable := f.seen[top.ver] == top.sig
		f.seen[top.ver] = top.sig
		act := stable && f.tried[top.ver] != top.sig && f.versions[top.ver] == nil && !f.static
		if act && f.primary != "" {
			cur, _ := strconv.ParseUint(f.primary, 10, 32)
			act = r.cfg.AutoPromote && top.num > cur // r.mu held
		}
		r.mu.Unlock()
		if !act {
			continue
		}
		r.log.Info("model repository: new version", "model", name, "version", top.ver)
		if err := r.Promote(ctx, name, top.ver); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Policy is the part of RegistryConfig that can change while serving
// (SetPolicy); zero values mean the documented defaults.
type Policy struct {
	Poll         time.Duration
	AutoPromote  bool
	DrainTimeout time.Duration
}

// SetPolicy changes how often Watch reads the repository, whether it
// promotes new versions by itself, and how long retired versions drain.
// A version already draining keeps the timeout it started with. A policy
// that does not validate is refused and the current one stays.
func (r *Registry) SetPolicy(p Policy) error {
	p, err := p.withDefaults()
	if err != nil {
		return err
	}
	r.mu.Lock()
	changed := r.cfg.Poll != p.Poll
	r.cfg.Poll, r.cfg.AutoPromote, r.cfg.DrainTimeout = p.Poll, p.AutoPromote, p.DrainTimeout
	r.mu.Unlock()
	if changed {
		select {
		case r.pollChanged <- struct{}{}:
		default: // a change already pending; Watch reads the latest
		}
	}
	return nil
}

func (p Policy) withDefaults() (Policy, error) {
	var errs []error
	if p.Poll < 0 {
		errs = append(errs, fmt.Errorf("model_repository.poll: must be >= 0, got %s", p.Poll))
	}
	if p.DrainTimeout < 0 {
		errs = append(errs, fmt.Errorf("model_repository.drain_timeout: must be >= 0, got %s", p.DrainTimeout))
	}
	if len(errs) > 0 {
		return p, errors.Join(errs...)
	}
	if p.Poll == 0 {
		p.Poll = DefaultRepositoryPoll
	}
	if p.DrainTimeout == 0 {
		p.DrainTimeout = DefaultDrainTimeout
	}
	return p, nil
}

// Close stops Watch and the retirements waiting for requests to drain.
func (r *Registry) Close() {
	r.closeOnce.Do(func() { close(r.closing) })
	r.wg.Wait()
}
