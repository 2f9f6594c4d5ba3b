package engine

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"h3infer/infer"
	"h3infer/priority"
	"h3infer/transport"
	"h3infer/workerconf"
)

// Span names of the worker's two phases of a request.
const (
	phasePrefill = "prefill"
	phaseDecode  = "decode"
)

// Config is what Run needs beyond the ring.
type Config struct {
	// Settings are the worker's, as the pool wrote them.
	Settings workerconf.Settings
	// Load loads a model directory the settings, or a later control
	// request, name: ONNX Runtime's package in the h3infer binary. The
	// synthetic model (workerconf.SyntheticDir) is built in and never
	// loaded. A control request names only a name and a directory, so
	// such a model runs on the CPU.
	Load func(spec workerconf.Model) (Model, error)
	// TracerProvider makes the prefill and decode spans, children of the
	// gateway's span named by each request's TraceParent; nil means no
	// tracing.
	TracerProvider trace.TracerProvider
}

// Run is the worker process: it maps the ring from the descriptor ring,
// loads the models, announces itself with Ready and then serves requests
// until the ring closes (a clean exit, nil) or ctx ends. Up to Slots
// sequences run at once, batched: each decode step advances all of a
// model's running sequences by one token in one step of the model.
//
// The worker does not notice by itself that its parent died; the pool
// starts it with Pdeathsig so the kernel ends it.
func Run(ctx context.Context, ring *os.File, cfg Config, log *slog.Logger) error {
	if err := cfg.Settings.Validate(); err != nil {
		ring.Close()
		return fmt.Errorf("worker settings: %w", err)
	}
	if len(cfg.Settings.Models) == 0 {
		ring.Close()
		return errors.New("worker settings: models: at least one is required")
	}
	s := cfg.Settings.WithDefaults()
	seg, err := transport.OpenSegment(ring)
	if err != nil {
		ring.Close()
		return fmt.Errorf("worker: open ring: %w", err)
	}
	defer seg.Close()
	end := transport.NewWorkerEnd(seg)
	// Closing our end tells the gateway at once, whatever made us stop.
	defer end.Close()

	open := func(spec workerconf.Model) (Model, error) {
		if iv, ok, err := workerconf.ParseSynthetic(spec.Dir); ok {
			if err != nil {
				return nil, err
			}
			return newSynthetic(spec.Name, iv), nil
		}
		if cfg.Load == nil {
			return nil, fmt.Errorf("model %s: this worker loads no model directories", spec.Name)
		}
		return cfg.Load(spec)
	}
	models := map[string]Model{}
	defer func() {
		for name, m := range models {
			if err := m.Close(); err != nil {
				log.Warn("close model", "model", name, "err", err)
			}
		}
	}()
	ready := transport.Ready{PID: uint32(os.Getpid())}
	for _, spec := range s.Models {
		m, err := open(spec)
		if err != nil {
			return fmt.Errorf("worker: %w", err)
		}
		models[spec.Name] = m
		ready.Models = append(ready.Models, m.Info())
		log.Info("model loaded", "model", spec.Name, "dir", spec.Dir, "context_length", m.Info().ContextLength)
	}
	if s.Slots == 0 {
		var fit int
		s.Slots, fit = autoSlots(models, s.KVCacheBytes)
		ready.SlotsFit = uint32(fit)
		log.Info("slots derived from the KV budget", "slots", s.Slots, "full_context_sequences_fit", fit, "kv_cache_bytes", s.KVCacheBytes)
	}
	ready.Slots = uint32(s.Slots)
	w := newWorkerLoop(end, s.Slots, s.KVCacheBytes, models, log)
	if cfg.TracerProvider != nil {
		w.tracer = cfg.TracerProvider.Tracer(tracerName)
	}
	w.open = open
	defer w.closeAll()
	if err := end.SendReady(ready); err != nil {
		return closedOK(fmt.Errorf("worker: send ready: %w", err))
	}
	log.Info("worker ready", "pid", ready.PID, "slots", s.Slots)

	inbox := make(chan inbound, 64)
	recvErr := make(chan error, 1)
	stopRecv := make(chan struct{})
	w.inbox, w.stop = inbox, stopRecv
	var wg sync.WaitGroup
	wg.Go(func() { receive(end, inbox, recvErr, stopRecv) })
	defer func() {
		end.Close() // wakes a Recv sleeping on the ring
		close(stopRecv)
		wg.Wait()
		w.loaders.Wait() // a loader that could not hand its model over closed it
		w.preparers.Wait()
	}()
	if nice := *s.Nice; nice > 0 {
		if w.bulk, err = newLane(nice); err != nil {
			return fmt.Errorf("worker: bulk lane: %w", err)
		}
		defer w.bulk.close()
	}
	return closedOK(w.serve(ctx, inbox, recvErr, s.StatsInterval))
}

// autoSlots is workerconf.AutoSlots for the models a worker starts with:
// the one whose full context takes the most cache decides. Versions
// loaded later do not change it; the KV budget still bounds how many of
// their sequences run.
func autoSlots(models map[string]Model, kvBudget int64) (slots, fit int) {
	var perSeq int64
	for _, m := range models {
		perSeq = max(perSeq, m.KVBytes(1, int(m.Info().ContextLength)))
	}
	return workerconf.AutoSlots(kvBudget, perSeq)
}

// closedOK turns the ring closing, the normal way for a worker to be told
// to stop, into a clean exit.
func closedOK(err error) error {
	if errors.Is(err, transport.ErrClosed) {
		return nil
	}
	return err
}

// inbound is one frame from the gateway, decoded by the receive goroutine
// because Recv reuses the payload's storage.
type inbound struct {
	typ     transport.FrameType
	id      uint64
	submit  infer.Request
	control transport.Control
	err     error
	// loaded is set, with typ 0, by a loader goroutine handing the loop
	// the outcome of a ControlLoad.
	loaded *loadOutcome
	// prepared is set, with typ 0, by a goroutine handing the loop a
	// large request's prompt, rendered and encoded beside it.
	prepared *preparedSeq
	// embedPrepared is set, with typ 0, by a goroutine handing the loop
	// an embedding request's inputs, tokenized beside it (embed.go).
	embedPrepared *embedPrep
}

// receive runs Recv until the ring closes or stop is closed. It does not
// lock its thread: Recv holds the thread only while it sleeps, and a
// locked receiver handed the loop it had just readied to another thread,
// which the kernel had to wake first (transport's GatewayEnd.Run says more).
func receive(end *transport.WorkerEnd, inbox chan<- inbound, recvErr chan<- error, stop <-chan struct{}) {
	for {
		f, err := end.Recv()
		if err != nil {
			recvErr <- err
			return
		}
		in := inbound{typ: f.Type, id: f.ID}
		switch f.Type {
		case transport.FrameSubmit:
			in.submit, in.err = transport.DecodeSubmit(f.Payload)
		case transport.FrameControl:
			in.control, in.err = transport.DecodeControl(f.Payload)
		case transport.FrameEmbed:
			decodeEmbed(&in, f.Payload)
		}
		select {
		case inbox <- in:
		case <-stop:
			return
		}
	}
}

// sender is what the loop sends on the ring; *transport.WorkerEnd in the
// worker, a recorder in tests that need to see exactly which tokens left.
type sender interface {
	SendToken(id uint64, t infer.Token) error
	SendTokens(ts []transport.TokenOut) error
	SendDone(id uint64, d infer.Done) error
	SendError(id uint64, e infer.Error) error
	SendStats(s transport.Stats) error
	// Beat counts the heartbeat the pool's hang detection watches.
	Beat()
}

// running is one admitted request: waiting for room in its model's batch
// (pending) or generating in it.
type running struct {
	id      uint64
	urgency priority.Urgency
	class   priority.Class
	arrival uint64 // admission order, breaking ties of urgency
	seq     *sequence
	batch   *batch // its model's batch

	ctx   context.Context // carries the gateway's span, when traced
	span  trace.Span      // prefill from admission to the first token, then decode
	phase string

	// choice is the sequence's index among its request's choices, and
	// group what they share (choices.go); nil for a request with one.
	// Only the leader, choice 0, is in pending, byID and prefilling.
	choice uint32
	group  *choices
	// ended is set when the sequence has left its batch for good.
	ended bool
}

// workerLoop is the generation loop's state; only serve's goroutine
// touches it, except the batch or sequence whose bulk work runs on the bulk
// lane meanwhile (aside).
//
// Slots and the KV-cache budget bound the batch. The scheduler sends a
// worker at most Slots requests at once, so admission only ever waits for
// KV memory; waiting requests are taken most urgent first (lowest RFC 9218
// u), then oldest. The head of that order is never overtaken, so a large
// urgent request is not starved by a stream of small, less urgent ones.
// Running sequences are never preempted: a sequence keeps its slot until
// it finishes or is cancelled.
type workerLoop struct {
	// outTokens are the token frames of the current step, sent in one
	// publish (flushTokens) rather than one ring publish per sequence;
	// stepped are the requests whose tokens they are.
	outTokens []transport.TokenOut
	stepped   []*running
	end       sender
	slots     int
	kvBudget  int64
	models    map[string]Model
	batches   []*batch // one per model, in a fixed order
	pending   []*running
	byID      map[uint64]*running
	arrivals  uint64
	stats     transport.Stats
	sentStats transport.Stats // the last stats sent (idle.go)
	log       *slog.Logger
	tracer    trace.Tracer

	// Versions come and go while the loop runs (control.go): loaders run
	// open beside the loop and hand their model back through inbox;
	// draining models take no new requests and close once their last
	// sequence ends.
	open     func(workerconf.Model) (Model, error)
	inbox    chan<- inbound
	stop     <-chan struct{}
	loaders  sync.WaitGroup
	loading  map[string]bool
	draining map[Model]bool

	// preparing are the admitted requests whose prompts are being
	// rendered and encoded beside the loop (prepare.go); they hold slots.
	preparing map[uint64]*preparedSeq
	preparers sync.WaitGroup

	// bulk, when set, runs the work of requests that are not urgent at a
	// lower priority than the loop's thread (nice.go); nil runs all of it
	// on the loop's thread. Work expected to take less than asideBelow()
	// runs on the loop's thread all the same.
	bulk     *lane
	asideMin time.Duration
	// inlineMax bounds what the hand-off's cost may keep on the loop's
	// thread; handoff is that cost as measured (asideBelow).
	inlineMax  time.Duration
	handoff    handoffCost
	inlined    int       // work kept on the loop's thread by handoff (stays)
	lastUrgent time.Time // when the last urgent request was admitted
	// While a bulk step runs aside, prefilled holds the urgent requests
	// prefilled meanwhile, to join their batch once the step is done,
	// and held the frames other than submits, to act on then.
	prefilled  []*prefilledRun
	held       []inbound
	prefilling *running // a bulk request whose prefill runs aside

	// embeds are the embedding requests waiting for their encoder
	// (embed.go); nil until the first arrives.
	embeds *embedQueue
}

// prefilledRun is an urgent request prefilled beside a bulk step, waiting
// to join its batch.
type prefilledRun struct {
	r  *running
	kv [][]byte
}

// batch is the running sequences of one model, in the order of the
// model's batch rows (Model): the loop's side of the batch the model
// keeps.
type batch struct {
	m    Model
	name string
	rows []*running
	next []int // the tokens a step feeds, by row
	// How long the model's work has been taking, which decides whether
	// bulk work goes to the bulk lane: a decode step, and a prefill per
	// prompt token. Only the loop's goroutine touches them.
	stepCost, prefillCost cost
}

// asideMin is the shortest bulk work ever handed to the bulk lane. The
// hand-off and the hand-back are two thread wake-ups, futex wakes that
// take about this long on an idle core (docs/BENCHMARKS.md, "Where the
// time to first token went") and far longer when the lane's raised nice
// has it wait for a busy CPU. Work shorter than that is done on the
// loop's thread before the lane would have started it; neither an urgent
// request nor the gateway would gain from the lane. Work not yet measured
// goes aside.
const asideMin = 20 * time.Microsecond

// What the hand-off costs decides the rest. Work that goes aside pays it
// on every step: measured on a 2-CPU VM, 70-80 µs a step, against a
// decode step of the demo model of about 270 µs, which made a single
// stream 1.2-1.3x slower than the same worker with no lane
// (docs/BENCHMARKS.md, "The bulk lane's hand-off"). Work kept on the
// loop's thread instead makes an urgent request that arrives meanwhile
// wait until it ends. So work shorter than handoffRatio hand-offs stays
// on the loop's thread (the hand-off would add over a fifth to it), but
// never work of inlineMax or more, which an urgent request should not
// wait behind, whatever the hand-off costs on a loaded machine. Real
// models' decode steps and prefills take milliseconds and go aside.
const (
	handoffRatio = 4
	inlineMax    = time.Millisecond
)

// asideBelow is the cost under which bulk work stays on the loop's
// thread: asideMin, raised to handoffRatio hand-offs as measured, up to
// inlineMax.
func (w *workerLoop) asideBelow() time.Duration {
	if !w.handoff.known {
		return w.asideMin
	}
	return max(w.asideMin, min(handoffRatio*w.handoff.avg, w.inlineMax))
}

// remeasureEvery: of the pieces of work that stay on the loop's thread
// only because of the hand-off's estimate, one in remeasureEvery goes
// aside all the same, to measure the hand-off again. Only work that goes
// aside measures it, so without this an estimate taken while the machine
// was slow would keep the work on the loop's thread for good.
const remeasureEvery = 32

// urgentRecent: a worker that has admitted an urgent request this
// recently hands all but the shortest bulk work (asideMin) to the lane,
// whatever the hand-off costs, since more urgent requests are likely to
// come and should not wait behind it. Priority isolation is what the
// lane is for; the hand-off's cost matters to a worker with no urgent
// traffic (docs/BENCHMARKS.md, "The bulk lane's hand-off").
const urgentRecent = 5 * time.Second

// stays reports whether bulk work of n units at cost c each runs on the
// loop's thread (asideBelow).
func (w *workerLoop) stays(c cost, n int) bool {
	per := time.Duration(n)
	if c.under(w.asideMin / per) {
		return true
	}
	if !c.under(w.asideBelow()/per) || time.Since(w.lastUrgent) < urgentRecent {
		return false
	}
	w.inlined++
	return w.inlined%remeasureEvery != 0
}

// handoffCost is the moving average of what handing work to the bulk
// lane and back has cost. An average, not the shortest (cost): a
// hand-off is quick when the runtime happens to have a thread awake and
// slow when it must wake one, and what a stream pays over its steps is
// the mix. Each sample is capped at inlineMax, so one stall on a loaded
// machine moves it by at most an eighth of that.
type handoffCost struct {
	avg   time.Duration
	known bool
}

func (h *handoffCost) add(d time.Duration) {
	d = min(d, inlineMax)
	if !h.known {
		h.avg, h.known = d, true
		return
	}
	h.avg += (d - h.avg) / 8
}

// cost estimates how long some work takes when it runs. It follows a
// shorter measurement at once and a longer one by at most an eighth (and a
// microsecond) a time: work does not get faster by chance, while a
// measurement that took longer may only have included time the thread
// spent waiting for a CPU, which says nothing of the work. Growing work
// (a batch that gains rows) still raises it within a few steps, and at
// once where it matters (raise): work kept on the loop's thread that took
// as long as what goes aside.
type cost struct {
	est   time.Duration
	known bool
}

func (c *cost) add(d time.Duration) {
	if !c.known || d < c.est {
		c.est, c.known = d, true
		return
	}
	c.est = min(d, c.est+c.est/8+time.Microsecond)
}

// raise follows a longer measurement at once: work that has grown.
func (c *cost) raise(d time.Duration) {
	if !c.known || d > c.est {
		c.est, c.known = d, true
	}
}

// under reports whether the work is known to take less than d.
func (c cost) under(d time.Duration) bool { return c.known && c.est < d }

func newBatch(name string, m Model) *batch { return &batch{m: m, name: name} }

// join adds r, prefilled with cache, as the batch's last row.
func (b *batch) join(r *running, cache [][]byte) {
	b.m.Join(cache, len(r.seq.prompt))
	r.seq.row = len(b.rows)
	b.rows = append(b.rows, r)
}

// leave removes r's row; the last row takes its number, as in the model.
func (b *batch) leave(r *running) {
	i, last := r.seq.row, len(b.rows)-1
	if i < 0 || i > last || b.rows[i] != r {
		return
	}
	b.m.Leave(i)
	r.seq.row = -1
	b.rows[i] = b.rows[last]
	b.rows[i].seq.row = i
	b.rows[last] = nil
	b.rows = b.rows[:last]
}

// step advances every row by one token and leaves each row's logits with
// its sequence.
func (b *batch) step() error {
	if len(b.rows) == 0 {
		return nil
	}
	b.next = b.next[:0]
	for _, r := range b.rows {
		b.next = append(b.next, r.seq.last)
	}
	logits, err := b.m.Step(b.next)
	if err != nil {
		return err
	}
	v := len(logits) / len(b.rows)
	for i, r := range b.rows {
		r.seq.logits = logits[i*v : (i+1)*v : (i+1)*v]
	}
	return nil
}

// close drops every row, the last first so that none moves.
func (b *batch) close() {
	for len(b.rows) > 0 {
		b.leave(b.rows[len(b.rows)-1])
	}
}

// tracerName is the instrumentation scope of the worker's spans.
const tracerName = "h3infer/engine"

// maxPrefillTokens bounds the prompt tokens prefilled between two decode
// steps, so that a burst of arrivals delays the running sequences' next
// token by a bounded amount. One prompt is always taken, however long.
const maxPrefillTokens = 1024

func newWorkerLoop(end sender, slots int, kvBudget int64, models map[string]Model, log *slog.Logger) *workerLoop {
	w := &workerLoop{end: end, slots: slots, kvBudget: kvBudget, models: models, byID: map[uint64]*running{},
		loading: map[string]bool{}, draining: map[Model]bool{}, preparing: map[uint64]*preparedSeq{}, log: log, tracer: noop.NewTracerProvider().Tracer(tracerName),
		asideMin: asideMin, inlineMax: inlineMax}
	names := make([]string, 0, len(models))
	for name := range models {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		w.batches = append(w.batches, newBatch(name, models[name]))
	}
	return w
}

func (w *workerLoop) serve(ctx context.Context, inbox <-chan inbound, recvErr <-chan error, every time.Duration) error {
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	nextStats := time.Now().Add(every)
	for {
		// The gateway's hang detection watches this. Idle, the loop passes
		// here at least every stats interval (the ticker below); busy, once
		// per decode round.
		w.end.Beat()
		if len(w.byID) == 0 && !w.embedding() {
			select {
			case in := <-inbox:
				if err := w.handle(in); err != nil {
					return err
				}
			case err := <-recvErr:
				return err
			case <-ticker.C:
				if err := w.sendStatsIfChanged(); err != nil {
					return err
				}
			case <-ctx.Done():
				return nil
			}
			continue
		}
		// Busy, the counters go out once the interval has passed by the
		// clock, which is cheaper to read between rounds than the ticker's
		// channel is to poll.
		select {
		case err := <-recvErr:
			return err
		case <-ctx.Done():
			return nil
		default:
		}
		if now := time.Now(); !now.Before(nextStats) {
			nextStats = now.Add(every)
			if err := w.sendStats(); err != nil {
				return err
			}
		}
		if err := w.round(inbox); err != nil {
			return err
		}
		if len(w.byID) == 0 && !w.embedding() {
			if err := w.sendStats(); err != nil {
				return err
			}
		}
	}
}

// round is one step boundary: take in frames, start waiting sequences
// that fit, then advance every batch by one token.
func (w *workerLoop) round(inbox <-chan inbound) error {
	// After a failed step, requests prefilled beside it still join.
	w.joinPrefilled()
	if err := w.drain(inbox); err != nil {
		return err
	}
	if err := w.start(inbox); err != nil {
		return err
	}
	if err := w.embedRound(); err != nil {
		return err
	}
	// Urgent requests that started beside a bulk prefill join before the
	// step.
	w.joinPrefilled()
	for _, b := range w.batches {
		if len(b.rows) == 0 {
			continue
		}
		var err error
		var took time.Duration
		if w.bulk == nil || w.carriesUrgent(b) || w.stays(b.stepCost, 1) {
			t := time.Now()
			err = b.step()
			took = time.Since(t)
			if took >= w.asideBelow() {
				// A batch that grew: its next step goes aside.
				b.stepCost.raise(took)
			}
		} else {
			// What the lane's function sets lives apart, so that only
			// this path pays for the closure's variables on the heap.
			var aside struct {
				err  error
				took time.Duration
			}
			wall, alone, aerr := w.aside(inbox, func() {
				t := time.Now()
				aside.err = b.step()
				aside.took = time.Since(t)
			})
			if aerr != nil {
				return aerr
			}
			err, took = aside.err, aside.took
			if alone {
				w.handoff.add(wall - took)
			}
		}
		b.stepCost.add(took)
		if err != nil {
			return w.failBatch(b, err)
		}
		// Cancels that arrived during the step drop their rows before the
		// step's tokens go out, so a cancelled sequence sends nothing
		// after the step in flight.
		if err := w.drain(inbox); err != nil {
			return err
		}
		// A row that finishes leaves the batch, which moves another into
		// its place: emit from a copy.
		w.stepped = append(w.stepped[:0], b.rows...)
		for _, r := range w.stepped {
			if err := w.emit(r); err != nil {
				return err
			}
		}
		clear(w.stepped)
		if err := w.flushTokens(); err != nil {
			return err
		}
		w.joinPrefilled()
	}
	w.reap()
	return nil
}

func (w *workerLoop) drain(inbox <-chan inbound) error {
	if err := w.handleHeld(); err != nil {
		return err
	}
	for {
		select {
		case in := <-inbox:
			if err := w.handle(in); err != nil {
				return err
			}
		default:
			return nil
		}
	}
}

// start moves waiting requests into their batches, most urgent first,
// while the KV budget allows, prefilling each alone and sending its first
// token.
func (w *workerLoop) start(inbox <-chan inbound) error {
	prefilled := 0
	for len(w.pending) > 0 && prefilled < maxPrefillTokens {
		r := w.pending[0]
		if !w.fits(r) {
			return nil
		}
		w.pending = w.pending[1:]
		// The span began at admission; the time before this event is the
		// wait for KV room and for the sequences ahead of it.
		r.span.AddEvent("prefill_started")
		var kv [][]byte
		var err error
		var took time.Duration
		n := len(r.seq.prompt)
		if w.bulk == nil || w.isUrgent(r) || w.stays(r.batch.prefillCost, n) {
			t := time.Now()
			kv, err = r.seq.prefill()
			took = time.Since(t)
			if took >= w.asideBelow() {
				r.batch.prefillCost.raise(took / time.Duration(n))
			}
		} else {
			var aside struct {
				kv   [][]byte
				err  error
				took time.Duration
			}
			// Counted against the KV budget while urgent requests
			// start beside it.
			w.prefilling = r
			wall, alone, aerr := w.aside(inbox, func() {
				t := time.Now()
				aside.kv, aside.err = r.seq.prefill()
				aside.took = time.Since(t)
			})
			w.prefilling = nil
			if aerr != nil {
				return aerr
			}
			kv, err, took = aside.kv, aside.err, aside.took
			if alone {
				w.handoff.add(wall - took)
			}
		}
		r.batch.prefillCost.add(took / time.Duration(n))
		if err != nil {
			if err := w.prefillFailed(r, err); err != nil {
				return err
			}
			continue
		}
		prefilled += len(r.seq.prompt)
		w.prefilledOnce(r)
		r.batch.join(r, kv)
		for _, s := range r.siblings() {
			r.batch.join(s, kv)
		}
		if err := w.emitAll(r); err != nil {
			return err
		}
		// The first token goes out now, not after the next prefill.
		if err := w.flushTokens(); err != nil {
			return err
		}
	}
	return nil
}

// prefillFailed answers r with the error of its prefill and drops it: the
// request's own fault (a logit_bias token past the vocabulary, which
// only the prefill's logits reveal) as is, anything else as the worker's.
func (w *workerLoop) prefillFailed(r *running, err error) error {
	r.span.RecordError(err)
	r.span.SetStatus(codes.Error, "prefill failed")
	w.forget(r)
	w.stats.SequencesFinished++
	if re, ok := errors.AsType[*RequestError](err); ok {
		return w.sendError(r.id, infer.Error{Code: re.Code, Message: re.Message})
	}
	w.log.Error("prefill failed", "request_id", r.id, "err", err)
	return w.sendError(r.id, infer.Error{Code: infer.CodeInternal, Message: "prefill failed: " + err.Error()})
}

// isUrgent says whether r's work runs on the loop's thread, at the
// process's priority, rather than on the bulk lane.
func (w *workerLoop) isUrgent(r *running) bool {
	return r != nil && r.class == priority.Urgent
}

// carriesUrgent says whether a step of b advances an urgent sequence: the
// step is shared, so the whole batch then runs on the loop's thread.
func (w *workerLoop) carriesUrgent(b *batch) bool {
	return slices.ContainsFunc(b.rows, w.isUrgent)
}

// aside runs bulk work f (a step, or a prefill) on the bulk lane and,
// until it returns, serves what arrives: a submit is admitted, and urgent
// requests at the head of the waiting order are prefilled on the loop's
// thread and send their first token at once; they join their batch after
// the step (joinPrefilled), which is why f must touch nothing but its own
// batch or sequence. Other frames (cancels, control) are held for
// handleHeld, so nothing changes a batch while it steps. A ring failure is
// returned only after f has returned. wall is the time from handing f
// over to seeing it done; alone reports that the loop took no frame
// meanwhile, so that wall is f's own time plus the hand-off's. Otherwise
// it may hold an urgent prefill that outlasted f, which is no part of
// the hand-off and would make it look several times dearer than it is.
func (w *workerLoop) aside(inbox <-chan inbound, f func()) (wall time.Duration, alone bool, err error) {
	start := time.Now()
	w.bulk.work <- f
	var failed error
	alone = true
	for {
		select {
		case <-w.bulk.done:
			return time.Since(start), alone, failed
		case in := <-inbox:
			alone = false
			if failed != nil {
				continue
			}
			if in.typ != transport.FrameSubmit {
				w.held = append(w.held, in)
				continue
			}
			if err := w.admit(in); err != nil {
				failed = err
				continue
			}
			failed = w.startUrgent()
		}
	}
}

// startUrgent prefills the urgent requests at the head of the waiting
// order that fit, while a bulk step runs aside, and sends their first
// tokens.
func (w *workerLoop) startUrgent() error {
	for len(w.pending) > 0 && w.isUrgent(w.pending[0]) && w.fits(w.pending[0]) {
		r := w.pending[0]
		w.pending = w.pending[1:]
		r.span.AddEvent("prefill_started")
		kv, err := r.seq.prefill()
		if err != nil {
			if err := w.prefillFailed(r, err); err != nil {
				return err
			}
			continue
		}
		w.prefilledOnce(r)
		// Listed before emit, so that forget finds it if the first token
		// is also the last.
		w.prefilled = append(w.prefilled, &prefilledRun{r: r, kv: kv})
		for _, s := range r.siblings() {
			w.prefilled = append(w.prefilled, &prefilledRun{r: s, kv: kv})
		}
		if err := w.emitAll(r); err != nil {
			return err
		}
		if err := w.flushTokens(); err != nil {
			return err
		}
	}
	return nil
}

// joinPrefilled adds the requests prefilled beside a step to their
// batches.
func (w *workerLoop) joinPrefilled() {
	for _, p := range w.prefilled {
		p.r.batch.join(p.r, p.kv)
	}
	clear(w.prefilled)
	w.prefilled = w.prefilled[:0]
}

// handleHeld acts on the frames held while a step ran aside, in order.
func (w *workerLoop) handleHeld() error {
	for len(w.held) > 0 {
		in := w.held[0]
		w.held = w.held[1:]
		if err := w.handle(in); err != nil {
			return err
		}
	}
	w.held = nil
	return nil
}

// fits reports whether r can join its batch within the KV budget: every
// batch is counted as if each of its rows grew to the longest reservation
// among them, which bounds the padded cache the batch can reach.
func (w *workerLoop) fits(r *running) bool {
	var total int64
	for _, b := range w.batches {
		rows, longest := len(b.rows), 0
		for _, x := range b.rows {
			longest = max(longest, x.seq.reserve())
		}
		for _, p := range w.prefilled {
			if p.r.batch == b {
				rows++
				longest = max(longest, p.r.seq.reserve())
			}
		}
		if p := w.prefilling; p != nil && p.batch == b {
			rows += p.width()
			longest = max(longest, p.seq.reserve())
		}
		if b == r.batch {
			rows += r.width()
			longest = max(longest, r.seq.reserve())
		}
		total += b.m.KVBytes(rows, longest)
	}
	return total <= w.kvBudget
}

// emit samples r's next token from its latest logits and sends it, and
// ends r if that token finished it. Only ring failures are returned.
func (w *workerLoop) emit(r *running) error {
	if r == nil {
		return nil
	}
	tok, done := r.seq.next()
	if r.group != nil {
		tok.Index = r.choice
		if done != nil {
			tok.FinishReason = done.FinishReason
		}
	}
	w.stats.TokensGenerated += uint64(tok.Count)
	w.outTokens = append(w.outTokens, transport.TokenOut{ID: r.id, Token: tok})
	if r.phase == phasePrefill {
		// The prefill sampled the first token; from here the sequence
		// advances one token per decode step of its batch.
		r.span.End()
		r.phase = phaseDecode
		if done == nil {
			_, r.span = w.tracer.Start(r.ctx, phaseDecode)
			if r.span.IsRecording() {
				r.span.SetAttributes(attribute.Int64("h3infer.request_id", int64(r.id)),
					attribute.Int("h3infer.batch_rows", len(r.batch.rows)))
			}
		}
	}
	if done == nil {
		return nil
	}
	if r.span.IsRecording() {
		r.span.SetAttributes(attribute.Int("h3infer.completion_tokens", int(done.CompletionTokens)),
			attribute.String("h3infer.finish_reason", done.FinishReason))
	}
	if r.group != nil {
		return w.choiceEnded(r, done)
	}
	w.forget(r)
	w.stats.SequencesFinished++
	return w.sendDone(r.id, *done)
}

// failBatch answers every sequence of a batch whose step failed with an
// error and drops them; the batch's cache can no longer be trusted.
func (w *workerLoop) failBatch(b *batch, err error) error {
	w.log.Error("decode step failed", "model", b.name, "rows", len(b.rows), "err", err)
	for _, r := range slices.Clone(b.rows) {
		if w.byID[r.id] == nil {
			continue // another choice of its request answered for it
		}
		r.span.RecordError(err)
		r.span.SetStatus(codes.Error, "decode step failed")
		w.forget(r)
		w.stats.SequencesFinished++
		if err := w.sendError(r.id, infer.Error{Code: infer.CodeInternal, Message: "generation failed: " + err.Error()}); err != nil {
			return err
		}
	}
	b.close()
	return nil
}

// handle acts on one frame from the gateway. Problems with a request are
// answered on the ring; only ring failures are returned.
func (w *workerLoop) handle(in inbound) error {
	switch in.typ {
	case transport.FrameSubmit:
		return w.admit(in)
	case transport.FrameEmbed:
		return w.admitEmbed(in)
	case transport.FrameCancel:
		// The gateway has already forgotten the call, so nothing is sent.
		if r := w.byID[in.id]; r != nil {
			r.span.AddEvent("cancelled")
			w.forget(r)
			w.stats.SequencesCancelled++
		} else if w.preparing[in.id] != nil {
			// Its prompt is dropped when it comes back.
			delete(w.preparing, in.id)
			w.stats.SequencesCancelled++
		} else if w.cancelEmbed(in.id) {
			w.stats.SequencesCancelled++
		}
	case transport.FrameControl:
		return w.control(in)
	case 0:
		if in.loaded != nil {
			return w.loaded(in.loaded)
		}
		if in.prepared != nil {
			return w.admitPrepared(in.prepared)
		}
		if in.embedPrepared != nil {
			return w.admitPreparedEmbed(in.embedPrepared)
		}
	case transport.FrameHeartbeat:
	default:
		w.log.Warn("unexpected frame from gateway", "frame", in.typ.String(), "request_id", in.id)
	}
	return nil
}

func (w *workerLoop) admit(in inbound) error {
	reject := func(code, msg string) error {
		return w.sendError(in.id, infer.Error{Code: code, Message: msg})
	}
	if in.err != nil {
		return reject(infer.CodeInvalidRequest, "malformed submit: "+in.err.Error())
	}
	if w.byID[in.id] != nil || w.preparing[in.id] != nil {
		return reject(infer.CodeInvalidRequest, fmt.Sprintf("request id %d is already running", in.id))
	}
	if err := w.checkChoices(&in.submit); err != nil {
		return reject(infer.CodeInvalidRequest, err.(*RequestError).Message)
	}
	if held, n := w.slotsHeld(), in.submit.Slots(); held+n > w.slots {
		if n == 1 {
			return reject(infer.CodeInternal, fmt.Sprintf("worker busy: all %d slots in use", w.slots))
		}
		return reject(infer.CodeInternal, fmt.Sprintf("worker busy: %d of %d slots in use, %d choices need as many", held, w.slots, n))
	}
	m := w.models[in.submit.Model]
	if m == nil {
		return reject(infer.CodeModelNotFound, fmt.Sprintf("model %q is not served by this worker", in.submit.Model))
	}
	if refused, err := w.refuseEncoder(in, m); refused {
		return err
	}
	if w.prepareAside(in, m) {
		return nil
	}
	seq, err := newSequence(m, &in.submit)
	return w.admitSequence(in, m, seq, err)
}

// admitSequence admits the request in whose sequence newSequence made,
// or answers it with newSequence's error.
func (w *workerLoop) admitSequence(in inbound, m Model, seq *sequence, err error) error {
	reject := func(code, msg string) error {
		return w.sendError(in.id, infer.Error{Code: code, Message: msg})
	}
	if err != nil {
		if re, ok := errors.AsType[*RequestError](err); ok {
			return reject(re.Code, re.Message)
		}
		w.log.Error("start generation", "request_id", in.id, "err", err)
		return reject(infer.CodeInternal, err.Error())
	}
	if n := in.submit.Slots(); n > 1 {
		if need := m.KVBytes(n, seq.reserve()); need > w.kvBudget {
			return reject(infer.CodeInvalidRequest, fmt.Sprintf(
				"n: %d choices that may reach %d tokens each need %d bytes of KV cache, over this worker's budget of %d bytes; ask for fewer choices or max_tokens",
				n, seq.reserve(), need, w.kvBudget))
		}
	}
	if need := m.KVBytes(1, seq.reserve()); need > w.kvBudget {
		return reject(infer.CodeInvalidRequest, fmt.Sprintf(
			"the request may reach %d tokens, whose KV cache (%d bytes) exceeds this worker's budget of %d bytes; ask for fewer max_tokens",
			seq.reserve(), need, w.kvBudget))
	}
	w.arrivals++
	r := &running{id: in.id, urgency: in.submit.Urgency, class: in.submit.Class, arrival: w.arrivals, seq: seq,
		ctx: context.Background(), phase: phasePrefill}
	if w.isUrgent(r) {
		w.lastUrgent = time.Now()
	}
	if tp := in.submit.TraceParent; tp != "" {
		r.ctx = propagation.TraceContext{}.Extract(r.ctx, propagation.MapCarrier{"traceparent": tp})
	}
	_, r.span = w.tracer.Start(r.ctx, phasePrefill)
	if r.span.IsRecording() {
		r.span.SetAttributes(attribute.Int64("h3infer.request_id", int64(in.id)),
			attribute.String("h3infer.model", in.submit.Model),
			attribute.Int("h3infer.prompt_tokens", len(seq.prompt)),
			attribute.Int("h3infer.urgency", int(in.submit.Urgency)))
	}
	for _, b := range w.batches {
		if b.m == m {
			r.batch = b
		}
	}
	w.group(r, &in.submit)
	// Most urgent first, then oldest; arrivals only grow, so the new one
	// goes after every equal.
	i, _ := slices.BinarySearchFunc(w.pending, r, func(a, b *running) int {
		if a.urgency != b.urgency {
			return int(a.urgency) - int(b.urgency)
		}
		return cmp.Compare(a.arrival, b.arrival)
	})
	w.pending = slices.Insert(w.pending, i, r)
	w.byID[in.id] = r
	w.stats.SequencesStarted++
	return nil
}

// forget drops r wherever it is: its batch row at once (freeing the slot
// for the next step) or its place in the waiting order.
func (w *workerLoop) forget(r *running) {
	delete(w.byID, r.id)
	if g := r.group; g != nil {
		for _, m := range g.members {
			w.drop(m)
		}
		return
	}
	w.drop(r)
}

// drop takes one sequence out of its batch, the waiting order or the
// prefilled list, once.
func (w *workerLoop) drop(r *running) {
	if r.ended {
		return
	}
	r.ended = true
	r.span.End()
	if r.seq.row >= 0 {
		r.batch.leave(r)
		return
	}
	if i := slices.Index(w.pending, r); i >= 0 {
		w.pending = slices.Delete(w.pending, i, i+1)
	}
	w.prefilled = slices.DeleteFunc(w.prefilled, func(p *prefilledRun) bool { return p.r == r })
}

func (w *workerLoop) sendStats() error {
	w.stats.Active = uint32(len(w.byID))
	w.sentStats = w.stats
	return w.end.SendStats(w.stats)
}

// closeAll forgets every sequence. The models are closed by Run, draining
// ones here, and drop their rows as they close, so no row leaves one by one.
func (w *workerLoop) closeAll() {
	for _, r := range w.byID {
		r.span.AddEvent("worker stopped")
		r.span.End()
		r.seq.row = -1
		for _, s := range r.siblings() {
			s.seq.row = -1
		}
	}
	for _, b := range w.batches {
		clear(b.rows)
		b.rows = b.rows[:0]
	}
	for m := range w.draining {
		if err := m.Close(); err != nil {
			w.log.Warn("close model", "model", m.Info().Name, "err", err)
		}
	}
	w.draining = nil
	w.pending, w.byID, w.prefilled, w.held = nil, nil, nil, nil
}

// flushTokens sends the queued token frames in one publish.
func (w *workerLoop) flushTokens() error {
	if len(w.outTokens) == 0 {
		return nil
	}
	var err error
	if len(w.outTokens) == 1 {
		// One sequence stepped, as at low concurrency: a frame of its own
		// skips the batch's bookkeeping.
		err = w.end.SendToken(w.outTokens[0].ID, w.outTokens[0].Token)
	} else {
		err = w.end.SendTokens(w.outTokens)
	}
	clear(w.outTokens)
	w.outTokens = w.outTokens[:0]
	return err
}

// sendDone and sendError end a request after the tokens queued before it,
// so its frames stay in order.
func (w *workerLoop) sendDone(id uint64, d infer.Done) error {
	if err := w.flushTokens(); err != nil {
		return err
	}
	return w.end.SendDone(id, d)
}

func (w *workerLoop) sendError(id uint64, e infer.Error) error {
	if err := w.flushTokens(); err != nil {
		return err
	}
	return w.end.SendError(id, e)
}
