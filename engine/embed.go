package engine

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"h3infer/infer"
	"h3infer/priority"
	"h3infer/transport"
)

// Embedding requests. An encoder model (an Embedder) answers them: the
// loop tokenizes a request's inputs when it arrives and, once per round,
// runs the waiting inputs of each encoder, across requests, as one padded
// batch of the model, up to maxEmbedRows rows and maxEmbedBatchTokens
// padded tokens; most urgent requests first, then oldest, a request's
// inputs in order. Each request's vectors go back as FrameEmbedding frames
// as its inputs are run, then its Done. Requests that arrive together thus
// share runs, and a request of many inputs takes several rounds, between
// which the decode steps of generating sequences go on.

// Embedder is a Model that serves embedding requests instead of
// generating: an encoder. Its generation methods are never called.
type Embedder interface {
	Model
	// Embed runs rows of token ids as one batch and returns each row's
	// vector, pooled and normalized as the model's configuration says,
	// shortened to dims[i] values where dims is not nil and dims[i] is
	// above 0. A row's vector must not depend on the rows beside it.
	Embed(rows [][]int, dims []int) ([][]float32, error)
	// VocabSize bounds the token ids an input may hold.
	VocabSize() int
}

// embeddingSender is what sends vectors: *transport.WorkerEnd. It is apart
// from sender so that the loop's tests' recorders need not know it.
type embeddingSender interface {
	SendEmbeddings(outs []transport.EmbeddingOut) error
}

// Bounds of one run of an encoder. Thirty-two rows is the batch size the
// benchmark measures up to; the padded-token bound keeps a run of long
// inputs (whose attention grows with the square of their length) from
// holding the loop's thread, and the decode steps behind it, for long.
const (
	maxEmbedRows        = 32
	maxEmbedBatchTokens = 8192
	// maxEmbeddingFrame bounds the vectors of one FrameEmbedding, so that
	// a frame fits the smallest ring a pool may configure (64 KiB) with
	// room to spare; at least one vector goes in each frame.
	maxEmbeddingFrame = 32 << 10
)

// embedJob is one admitted embedding request.
type embedJob struct {
	id      uint64
	urgency priority.Urgency
	arrival uint64
	m       Embedder
	inputs  [][]int
	next    int // inputs[:next] have been run and sent
	dims    int
	tokens  int
	span    trace.Span
}

// embedQueue is the loop's waiting embedding requests, most urgent first,
// then oldest.
type embedQueue struct {
	jobs []*embedJob
	// preparing are the requests whose inputs are being tokenized beside
	// the loop; they hold slots.
	preparing map[uint64]*embedPrep
	// Scratch of a round, reused.
	rows  [][]int
	dims  []int
	takes []embedTake
	out   []transport.EmbeddingOut
}

// embedTake is a run's share of one request: n inputs from its next.
type embedTake struct {
	j *embedJob
	n int
}

// embedding reports whether embedding requests are waiting.
func (w *workerLoop) embedding() bool { return w.embeds != nil && len(w.embeds.jobs) > 0 }

// embedJobs is how many embedding requests hold slots.
func (w *workerLoop) embedJobs() int {
	if w.embeds == nil {
		return 0
	}
	return len(w.embeds.jobs) + len(w.embeds.preparing)
}

// findEmbed is the waiting embedding request id, or nil.
func (w *workerLoop) findEmbed(id uint64) *embedJob {
	if w.embeds == nil {
		return nil
	}
	for _, j := range w.embeds.jobs {
		if j.id == id {
			return j
		}
	}
	return nil
}

// cancelEmbed drops embedding request id, if it is waiting, and reports
// whether it was.
func (w *workerLoop) cancelEmbed(id uint64) bool {
	if w.embedPreparing(id) {
		// Its inputs are dropped when they come back.
		delete(w.embeds.preparing, id)
		return true
	}
	j := w.findEmbed(id)
	if j == nil {
		return false
	}
	j.span.AddEvent("cancelled")
	w.dropEmbed(j)
	return true
}

func (w *workerLoop) dropEmbed(j *embedJob) {
	j.span.End()
	w.embeds.jobs = slices.DeleteFunc(w.embeds.jobs, func(x *embedJob) bool { return x == j })
}

// admitEmbed checks and tokenizes an embedding request and queues it, or
// answers it with why not. Inputs of more than prepareInline bytes of
// text are tokenized in a goroutine beside the loop, as large prompts are
// (prepare.go), so that one client's megabyte of text does not stall the
// other requests of the worker; the request holds a slot meanwhile. Only
// ring failures are returned.
func (w *workerLoop) admitEmbed(in inbound) error {
	reject := func(code, format string, a ...any) error {
		return w.sendError(in.id, infer.Error{Code: code, Message: fmt.Sprintf(format, a...)})
	}
	if in.err != nil {
		return reject(infer.CodeInvalidRequest, "malformed embed: %v", in.err)
	}
	if w.byID[in.id] != nil || w.preparing[in.id] != nil || w.findEmbed(in.id) != nil || w.embedPreparing(in.id) {
		return reject(infer.CodeInvalidRequest, "request id %d is already running", in.id)
	}
	if w.slotsHeld() >= w.slots {
		return reject(infer.CodeInternal, "worker busy: all %d slots in use", w.slots)
	}
	m := w.models[in.submit.Model]
	if m == nil {
		return reject(infer.CodeModelNotFound, "model %q is not served by this worker", in.submit.Model)
	}
	enc, ok := m.(Embedder)
	if !ok {
		return reject(infer.CodeInvalidRequest, "model %q generates text and serves no embeddings; use /v1/chat/completions or /v1/completions", in.submit.Model)
	}
	if w.embeds == nil {
		w.embeds = &embedQueue{preparing: map[uint64]*embedPrep{}}
	}
	textBytes := 0
	for _, t := range in.submit.Embed.Texts {
		textBytes += len(t)
	}
	if w.inbox == nil || textBytes <= prepareInline {
		j, rerr := prepareEmbed(in, enc)
		return w.queueEmbed(in, j, rerr)
	}
	p := &embedPrep{in: in, m: enc}
	w.embeds.preparing[in.id] = p
	w.preparers.Go(func() {
		p.j, p.err = prepareEmbed(p.in, p.m)
		select {
		case w.inbox <- inbound{embedPrepared: p}:
		case <-w.stop:
		}
	})
	return nil
}

// embedPrep is an embedding request whose inputs a goroutine tokenizes
// beside the loop, and then its outcome.
type embedPrep struct {
	in  inbound
	m   Embedder
	j   *embedJob
	err *infer.Error
}

func (w *workerLoop) embedPreparing(id uint64) bool {
	return w.embeds != nil && w.embeds.preparing[id] != nil
}

// admitPreparedEmbed queues a request tokenized aside, unless it was
// cancelled meanwhile or its model has gone.
func (w *workerLoop) admitPreparedEmbed(p *embedPrep) error {
	if w.embeds.preparing[p.in.id] != p {
		return nil // cancelled; the gateway has forgotten the call
	}
	delete(w.embeds.preparing, p.in.id)
	if name := p.in.submit.Model; w.models[name] != Model(p.m) {
		return w.sendError(p.in.id, infer.Error{Code: infer.CodeModelNotFound,
			Message: fmt.Sprintf("model %q is not served by this worker", name)})
	}
	return w.queueEmbed(p.in, p.j, p.err)
}

// prepareEmbed checks an embedding request against its model and
// tokenizes its inputs: the job to queue, or the error to answer with. It
// touches nothing of the loop's, so it may run beside it.
func prepareEmbed(in inbound, enc Embedder) (*embedJob, *infer.Error) {
	reject := func(code, format string, a ...any) (*embedJob, *infer.Error) {
		return nil, &infer.Error{Code: code, Message: fmt.Sprintf(format, a...)}
	}
	req := in.submit.Embed
	info := enc.Info()
	if d := req.Dimensions; d != 0 {
		switch {
		case !info.Matryoshka:
			return reject(infer.CodeInvalidRequest, "dimensions: the model does not support shortening its vectors")
		case info.EmbeddingSize != 0 && d > info.EmbeddingSize:
			return reject(infer.CodeInvalidRequest, "dimensions: %d is more than the %d values of the model's vectors", d, info.EmbeddingSize)
		}
	}
	j := &embedJob{id: in.id, urgency: in.submit.Urgency, m: enc, dims: int(req.Dimensions)}
	j.inputs = make([][]int, 0, req.Len())
	ctxLen, vocab := int(info.ContextLength), enc.VocabSize()
	for i, text := range req.Texts {
		ids := enc.EncodeSpecial(text)
		if len(ids) == 0 {
			return reject(infer.CodeInvalidRequest, "input[%d]: no tokens; an input must not be empty", i)
		}
		j.inputs = append(j.inputs, ids)
	}
	for i, toks := range req.Tokens {
		ids := make([]int, len(toks))
		for k, id := range toks {
			if int64(id) >= int64(vocab) {
				return reject(infer.CodeInvalidRequest, "input[%d][%d]: token id %d is not below the vocabulary size %d", i, k, id, vocab)
			}
			ids[k] = int(id)
		}
		j.inputs = append(j.inputs, ids)
	}
	for i, ids := range j.inputs {
		if len(ids) > ctxLen {
			return reject(infer.CodeContextLength, "input[%d] is %d tokens, more than the model's context length of %d", i, len(ids), ctxLen)
		}
		if j.tokens += len(ids); j.tokens > infer.MaxEmbedTokens {
			return reject(infer.CodeInvalidRequest, "input: more than %d tokens in all", infer.MaxEmbedTokens)
		}
	}
	return j, nil
}

// queueEmbed puts job j of request in in the waiting order, or answers
// the request with rerr.
func (w *workerLoop) queueEmbed(in inbound, j *embedJob, rerr *infer.Error) error {
	if rerr != nil {
		return w.sendError(in.id, *rerr)
	}
	ctx := context.Background()
	if tp := in.submit.TraceParent; tp != "" {
		ctx = propagation.TraceContext{}.Extract(ctx, propagation.MapCarrier{"traceparent": tp})
	}
	_, j.span = w.tracer.Start(ctx, "embed")
	if j.span.IsRecording() {
		j.span.SetAttributes(attribute.Int64("h3infer.request_id", int64(in.id)),
			attribute.String("h3infer.model", in.submit.Model),
			attribute.Int("h3infer.inputs", len(j.inputs)),
			attribute.Int("h3infer.prompt_tokens", j.tokens),
			attribute.Int("h3infer.urgency", int(in.submit.Urgency)))
	}
	w.arrivals++
	j.arrival = w.arrivals
	q := w.embeds
	i, _ := slices.BinarySearchFunc(q.jobs, j, func(a, b *embedJob) int {
		if a.urgency != b.urgency {
			return int(a.urgency) - int(b.urgency)
		}
		return cmp.Compare(a.arrival, b.arrival)
	})
	q.jobs = slices.Insert(q.jobs, i, j)
	return nil
}

// embedRound runs one batch of each encoder that has inputs waiting and
// sends what it made. Only ring failures are returned.
func (w *workerLoop) embedRound() error {
	if !w.embedding() {
		return nil
	}
	q := w.embeds
	var seen []Embedder
	for _, first := range slices.Clone(q.jobs) {
		if slices.Contains(seen, first.m) {
			continue
		}
		seen = append(seen, first.m)
		if err := w.embedBatch(first.m); err != nil {
			return err
		}
	}
	return nil
}

// embedBatch runs the next inputs of m's waiting requests as one batch.
func (w *workerLoop) embedBatch(m Embedder) error {
	q := w.embeds
	q.rows, q.dims, q.takes = q.rows[:0], q.dims[:0], q.takes[:0]
	longest := 0
fill:
	for _, j := range q.jobs {
		if j.m != m {
			continue
		}
		take := embedTake{j: j}
		for k := j.next; k < len(j.inputs); k++ {
			l := max(longest, len(j.inputs[k]))
			if len(q.rows) > 0 && (len(q.rows) == maxEmbedRows || (len(q.rows)+1)*l > maxEmbedBatchTokens) {
				if take.n > 0 {
					q.takes = append(q.takes, take)
				}
				break fill
			}
			q.rows = append(q.rows, j.inputs[k])
			q.dims = append(q.dims, j.dims)
			longest = l
			take.n++
		}
		q.takes = append(q.takes, take)
	}
	vecs, err := m.Embed(q.rows, q.dims)
	if err == nil && len(vecs) != len(q.rows) {
		err = fmt.Errorf("%d vectors for %d rows", len(vecs), len(q.rows))
	}
	takes := slices.Clone(q.takes)
	clear(q.rows)
	if err != nil {
		w.log.Error("embedding run failed", "model", m.Info().Name, "rows", len(q.rows), "err", err)
		for _, t := range takes {
			t.j.span.RecordError(err)
			t.j.span.SetStatus(codes.Error, "embedding failed")
			w.dropEmbed(t.j)
			if err := w.sendError(t.j.id, infer.Error{Code: infer.CodeInternal, Message: "embedding failed: " + err.Error()}); err != nil {
				return err
			}
		}
		return nil
	}
	vs, ok := w.end.(embeddingSender)
	if !ok {
		return errors.New("worker: the ring's sender cannot send embeddings")
	}
	// Every request's frames of the run, and the Done of those it
	// finished, go out in one publish.
	q.out = q.out[:0]
	for _, t := range takes {
		j := t.j
		mine := vecs[:t.n]
		vecs = vecs[t.n:]
		for len(mine) > 0 {
			per := max(1, maxEmbeddingFrame/(4*len(mine[0])))
			n := min(per, len(mine))
			q.out = append(q.out, transport.EmbeddingOut{ID: j.id, Embedding: infer.Embedding{Index: uint32(j.next), Vectors: mine[:n]}})
			j.next += n
			mine = mine[n:]
		}
		if j.next == len(j.inputs) {
			q.out[len(q.out)-1].Done = &infer.Done{FinishReason: infer.FinishStop, PromptTokens: uint32(j.tokens)}
			w.dropEmbed(j)
		}
	}
	if err := w.flushTokens(); err != nil {
		return err
	}
	err = vs.SendEmbeddings(q.out)
	clear(q.out)
	return err
}

// refuseEncoder answers a completion request for an encoder model.
func (w *workerLoop) refuseEncoder(in inbound, m Model) (bool, error) {
	if _, ok := m.(Embedder); !ok {
		return false, nil
	}
	return true, w.sendError(in.id, infer.Error{Code: infer.CodeInvalidRequest, Message: fmt.Sprintf(
		"model %q is an embedding model and generates no text; use /v1/embeddings", in.submit.Model)})
}

// decodeEmbed is the receive goroutine's decoding of a FrameEmbed.
func decodeEmbed(in *inbound, p []byte) { in.submit, in.err = transport.DecodeEmbed(p) }

// embedsFor reports whether embedding requests wait for model m, which a
// draining model must finish before it closes.
func (w *workerLoop) embedsFor(m Model) bool {
	return w.embeds != nil && slices.ContainsFunc(w.embeds.jobs, func(j *embedJob) bool { return Model(j.m) == m })
}

// checkEncoder warms an encoder up, as check does a generative model: a
// run of two rows of different lengths touches the kernels a batch uses.
// A golden check is a generation's, which an encoder cannot make.
func checkEncoder(e Embedder, g *golden) error {
	if g != nil {
		return fmt.Errorf("%s: model %s is an encoder, which generates no text to check", goldenFile, e.Info().Name)
	}
	rows := [][]int{e.EncodeSpecial("Hello"), e.EncodeSpecial("Hello, world")}
	if _, err := e.Embed(rows, nil); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	return nil
}
