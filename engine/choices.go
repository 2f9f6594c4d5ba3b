package engine

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"

	"go.opentelemetry.io/otel/trace"

	"h3infer/constrain"
	"h3infer/infer"
	"h3infer/tokenize"
)

// A request with n > 1 choices runs as n sequences, one row of its
// model's batch each, that share one prefill: the first choice (the
// leader) waits, is prefilled and starts as any request does, and at that
// moment the others take copies of its last logits and join the batch
// with the same prompt cache (Model.Join copies it into the row). From
// there each choice samples with its own sampler, seed, stop strings,
// token limit and response_format matcher, and leaves the batch when it
// ends; the request's Done goes out after its last choice's.

// choices is the state the n sequences of one request share.
type choices struct {
	members    []*running // by choice index; members[0] is the leader
	live       int        // choices still generating
	completion uint32     // completion tokens of the choices that ended
	reason0    string     // choice 0's finish reason, for the Done
}

// width is how many slots and batch rows r's request takes.
func (r *running) width() int {
	if r.group == nil {
		return 1
	}
	return len(r.group.members)
}

// fork is the sequence of choice i of the request s whose choice 0 is q,
// not yet prefilled: the same prompt, limit and compiled response_format
// (immutable, so shared), with a sampler and text stream of its own.
func (q *sequence) fork(s *infer.Request, i int) *sequence {
	c := *q
	seed := rand.Uint64()
	if s.HasSeed {
		seed = infer.ChoiceSeed(s.Seed, i)
	}
	c.smp = newSampler(s, q.prompt, seed)
	c.text = tokenize.NewStream(s.Stop)
	c.logits = nil
	c.row = -1
	return &c
}

// share hands q's prefill to c, a fork of q: a copy of the last
// position's logits (a sampler with penalties or a mask may write to
// its own) and, with a response_format, a matcher of its own over the
// same vocabulary.
func (q *sequence) share(c *sequence) {
	c.logits = slices.Clone(q.logits)
	if q.smp.format != nil {
		c.smp.format = constrain.NewMatcher(q.format, q.vocab)
		c.vocab = q.vocab
	}
}

// group makes r, just admitted for request s, the leader of s.N choices.
// The others are forked now, so that a request whose fork fails never
// starts, and run no span of their own: the leader's prefill and decode
// spans stand for the request.
func (w *workerLoop) group(r *running, s *infer.Request) {
	if s.N <= 1 {
		return
	}
	g := &choices{members: make([]*running, s.N), live: int(s.N)}
	g.members[0] = r
	r.group = g
	quiet := trace.SpanFromContext(context.Background())
	for i := 1; i < int(s.N); i++ {
		g.members[i] = &running{id: r.id, urgency: r.urgency, class: r.class, arrival: r.arrival,
			seq: r.seq.fork(s, i), batch: r.batch, ctx: r.ctx, span: quiet, phase: phaseDecode,
			choice: uint32(i), group: g}
	}
}

// siblings are the choices of r's request that share its prefill, none
// for a request with one choice.
func (r *running) siblings() []*running {
	if r.group == nil {
		return nil
	}
	return r.group.members[1:]
}

// spread gives the leader r's prefill to its siblings.
func (r *running) spread() {
	for _, s := range r.siblings() {
		r.seq.share(s.seq)
	}
}

// choiceEnded drops choice r, whose last token was just queued, and ends
// its request with the Done for every choice once it was the last.
func (w *workerLoop) choiceEnded(r *running, done *infer.Done) error {
	g := r.group
	w.drop(r)
	g.live--
	g.completion += done.CompletionTokens
	if r.choice == 0 {
		g.reason0 = done.FinishReason
	}
	if g.live > 0 {
		return nil
	}
	lead := g.members[0]
	if lead.span.IsRecording() {
		lead.span.AddEvent("choices_done")
	}
	delete(w.byID, r.id)
	w.stats.SequencesFinished++
	return w.sendDone(r.id, infer.Done{FinishReason: g.reason0, PromptTokens: done.PromptTokens, CompletionTokens: g.completion})
}

// slotsHeld is how many slots the admitted requests take, those being
// prepared aside and embedding requests (one each) included.
func (w *workerLoop) slotsHeld() int {
	n := 0
	for _, r := range w.byID {
		n += r.width()
	}
	for _, p := range w.preparing {
		n += p.in.submit.Slots()
	}
	return n + w.embedJobs()
}

// checkChoices refuses a request for more choices than the worker has
// slots; the scheduler never sends one (it counts a request's slots
// too), so this guards against a gateway that does.
func (w *workerLoop) checkChoices(s *infer.Request) error {
	if n := s.Slots(); n > w.slots || n > infer.MaxChoices {
		return &RequestError{infer.CodeInvalidRequest, fmt.Sprintf(
			"n: %d choices need %d slots of one worker, and this worker has %d (at most %d choices)", n, n, w.slots, infer.MaxChoices)}
	}
	if offersTools(s) && s.Slots() > 1 {
		return &RequestError{infer.CodeInvalidRequest, "n: several choices cannot be combined with tools the model may call"}
	}
	return nil
}

// offersTools reports whether r lets the model call a tool: its calls
// are answered for one choice only.
func offersTools(r *infer.Request) bool {
	return r.Tools != "" && r.ToolChoice != infer.ToolNone
}

// prefilledOnce counts the prefill of r's prompt, which all its choices
// share.
func (w *workerLoop) prefilledOnce(r *running) {
	w.stats.Prefills++
	w.stats.PrefillTokens += uint64(len(r.seq.prompt))
	r.spread()
}

// emitAll sends the first token of every choice of the leader r, just
// prefilled.
func (w *workerLoop) emitAll(r *running) error {
	if err := w.emit(r); err != nil {
		return err
	}
	for _, s := range r.siblings() {
		if err := w.emit(s); err != nil {
			return err
		}
	}
	return nil
}
