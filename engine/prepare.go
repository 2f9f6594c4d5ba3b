package engine

import (
	"fmt"

	"h3infer/infer"
)

// prepareInline is the most prompt text, in bytes, whose chat template
// and tokenizer run on the loop's own thread. Below it the work takes
// microseconds, less than handing it to a goroutine and back would add to
// the first token. Above it, a request's prompt could stall every
// sequence of the worker for as long as it takes: encoding runs at about
// 5-10 MB/s (docs/BENCHMARKS.md, "Tokenizers"), a 1 MiB prompt for 0.1 s
// or more, and a model's own Jinja template may loop over the messages
// inside its loop over them.
const prepareInline = 16 << 10

// preparedSeq is a request whose prompt a goroutine renders and encodes
// beside the loop, and then its outcome.
type preparedSeq struct {
	in  inbound
	m   Model
	seq *sequence
	err error
}

// promptBytes is how much text a request's prompt has to render and
// encode.
func promptBytes(s *infer.Request) int {
	n := len(s.Prompt)
	for _, m := range s.Messages {
		n += len(m.Role) + len(m.Content)
	}
	return n
}

// prepareAside starts preparing a large request's sequence in a goroutine
// and reports whether it did; the loop admits the request when the
// outcome comes back through its inbox (admitPrepared). The request holds
// a slot meanwhile, and a cancel drops it. A loop without an inbox (tests
// driving it by hand) prepares everything inline.
func (w *workerLoop) prepareAside(in inbound, m Model) bool {
	if w.inbox == nil || promptBytes(&in.submit) <= prepareInline {
		return false
	}
	p := &preparedSeq{in: in, m: m}
	w.preparing[in.id] = p
	w.preparers.Go(func() {
		p.seq, p.err = newSequence(m, &p.in.submit)
		select {
		case w.inbox <- inbound{prepared: p}:
		case <-w.stop:
		}
	})
	return true
}

// admitPrepared admits a request whose sequence was prepared aside,
// unless it was cancelled meanwhile or its model has gone.
func (w *workerLoop) admitPrepared(p *preparedSeq) error {
	if w.preparing[p.in.id] != p {
		return nil // cancelled; the gateway has forgotten the call
	}
	delete(w.preparing, p.in.id)
	if name := p.in.submit.Model; w.models[name] != p.m {
		return w.sendError(p.in.id, infer.Error{Code: infer.CodeModelNotFound,
			Message: fmt.Sprintf("model %q is not served by this worker", name)})
	}
	return w.admitSequence(p.in, p.m, p.seq, p.err)
}
