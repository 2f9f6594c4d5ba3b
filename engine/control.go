package engine

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"h3infer/infer"
	"h3infer/transport"
	"h3infer/workerconf"
)

// goldenFile, when a model directory holds one, is a prompt and the text
// greedy decoding must produce from it; a version whose answer differs is
// refused before it serves anything.
const goldenFile = "golden.json"

// golden is goldenFile.
type golden struct {
	Prompt    string `json:"prompt"`
	Expect    string `json:"expect"`
	MaxTokens int    `json:"max_tokens"`
}

// readGolden returns the golden check of dir, or nil when it has none.
func readGolden(dir string) (*golden, error) {
	data, err := os.ReadFile(filepath.Join(dir, goldenFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", goldenFile, err)
	}
	var g golden
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&g); err != nil {
		return nil, fmt.Errorf("%s: decode: %w", goldenFile, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%s: trailing data after the JSON object", goldenFile)
	}
	var errs []error
	if g.Prompt == "" {
		errs = append(errs, fmt.Errorf("%s: prompt: must not be empty", goldenFile))
	}
	if g.MaxTokens < 0 {
		errs = append(errs, fmt.Errorf("%s: max_tokens: must be >= 0, got %d", goldenFile, g.MaxTokens))
	}
	if g.MaxTokens == 0 {
		g.MaxTokens = 16
	}
	return &g, errors.Join(errs...)
}

// warmUpTimeout bounds the warm-up and golden generations of a new
// version; a model that cannot answer a short prompt in this time is not
// fit to take traffic.
const warmUpTimeout = 2 * time.Minute

// prepare opens spec as the worker's models are opened, then runs it once
// so that the first request does not pay for the runtime's lazy
// initialisation, and, when spec's directory holds golden.json, checks
// that greedy decoding of its prompt gives its expected text. A model that
// fails any step is closed.
func prepare(ctx context.Context, open func(workerconf.Model) (Model, error), spec workerconf.Model) (Model, error) {
	m, err := open(spec)
	if err != nil {
		return nil, err
	}
	if err := check(ctx, m, spec.Dir); err != nil {
		m.Close()
		return nil, fmt.Errorf("load model %s: %w", spec.Dir, err)
	}
	return m, nil
}

// check warms m up and runs the golden check of dir, if it has one.
func check(ctx context.Context, m Model, dir string) error {
	g, err := readGolden(dir)
	if err != nil {
		return err
	}
	if e, ok := m.(Embedder); ok {
		return checkEncoder(e, g)
	}
	ctx, cancel := context.WithTimeout(ctx, warmUpTimeout)
	defer cancel()
	// Warm-up: a prefill and a few batched steps touch every kernel a
	// request will use.
	warm := &infer.Request{Prompt: "Hello", MaxTokens: 4, HasSeed: true}
	if _, _, err := Generate(ctx, m, warm); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	if g == nil {
		return nil
	}
	got, _, err := Generate(ctx, m, &infer.Request{Prompt: g.Prompt, MaxTokens: uint32(g.MaxTokens), HasSeed: true})
	if err != nil {
		return fmt.Errorf("golden check: %w", err)
	}
	if !strings.HasPrefix(got, g.Expect) {
		return fmt.Errorf("golden check: prompt %q gave %q, want it to begin with %q", g.Prompt, got, g.Expect)
	}
	return nil
}

// loadOutcome is a loader's outcome, handed to the loop.
type loadOutcome struct {
	id   uint64
	name string
	dir  string
	m    Model
	err  error
}

// control acts on a FrameControl. Loading runs in a goroutine of its own
// so that the running sequences keep decoding while a new version's
// session is built and warmed up.
func (w *workerLoop) control(in inbound) error {
	fail := func(code, msg string) error {
		return w.end.SendError(in.id, infer.Error{Code: code, Message: msg})
	}
	if in.err != nil {
		return fail(infer.CodeInvalidRequest, "malformed control: "+in.err.Error())
	}
	c := in.control
	switch c.Op {
	case transport.ControlLoad:
		if c.Name == "" || c.Dir == "" {
			return fail(infer.CodeInvalidRequest, "load: name and dir are required")
		}
		if w.models[c.Name] != nil || w.loading[c.Name] {
			return fail(infer.CodeInvalidRequest, fmt.Sprintf("load: model %q is already served or loading", c.Name))
		}
		if w.inbox == nil || w.open == nil {
			return fail(infer.CodeInternal, "load: this worker cannot load models")
		}
		w.loading[c.Name] = true
		w.loaders.Go(func() {
			m, err := prepare(context.Background(), w.open, workerconf.Model{Name: c.Name, Dir: c.Dir})
			r := &loadOutcome{id: in.id, name: c.Name, dir: c.Dir, m: m, err: err}
			select {
			case w.inbox <- inbound{loaded: r}:
			case <-w.stop:
				if m != nil {
					m.Close()
				}
			}
		})
		return nil
	case transport.ControlUnload:
		m := w.models[c.Name]
		if m == nil {
			return fail(infer.CodeModelNotFound, fmt.Sprintf("unload: model %q is not served by this worker", c.Name))
		}
		// Requests already admitted finish; new ones find no such model.
		delete(w.models, c.Name)
		w.draining[m] = true
		w.log.Info("model unloading", "model", c.Name)
		w.reap()
		return w.end.SendDone(in.id, infer.Done{FinishReason: transport.FinishOK})
	}
	return fail(infer.CodeInvalidRequest, fmt.Sprintf("unknown control op %d", c.Op))
}

// loaded installs a model a loader prepared, or reports why it could not.
func (w *workerLoop) loaded(r *loadOutcome) error {
	delete(w.loading, r.name)
	if r.err != nil {
		w.log.Error("model load failed", "model", r.name, "dir", r.dir, "err", r.err)
		return w.end.SendError(r.id, infer.Error{Code: infer.CodeInvalidRequest, Message: r.err.Error()})
	}
	w.models[r.name] = r.m
	w.batches = append(w.batches, newBatch(r.name, r.m))
	w.log.Info("model loaded", "model", r.name, "dir", r.dir, "context_length", r.m.Info().ContextLength)
	return w.end.SendDone(r.id, infer.Done{FinishReason: transport.FinishOK})
}

// reap closes draining models whose last sequence has ended.
func (w *workerLoop) reap() {
	for m := range w.draining {
		var b *batch
		for _, x := range w.batches {
			if x.m == m {
				b = x
			}
		}
		if b != nil && len(b.rows) > 0 {
			continue
		}
		if slices.ContainsFunc(w.pending, func(r *running) bool { return r.batch == b }) {
			continue
		}
		if w.embedsFor(m) {
			continue
		}
		if b != nil {
			b.close()
			w.batches = slices.DeleteFunc(w.batches, func(x *batch) bool { return x == b })
		}
		delete(w.draining, m)
		name := m.Info().Name
		if err := m.Close(); err != nil {
			w.log.Warn("close model", "model", name, "err", err)
		}
		w.log.Info("model unloaded", "model", name)
	}
}
