package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	"h3infer/infer"
)

// Answers with n > 1 choices. The worker sends each choice's tokens
// tagged with its index, interleaved as its batch steps them, each
// choice's last with its finish reason, then one Done for all; the
// answer has a choice per index, streamed or whole. A request with one
// choice never comes here: its path (relay, collect) stays as it was.

// respondChoices answers a request for several choices from its first
// event ev on.
func (g *Gateway) respondChoices(ctx context.Context, w http.ResponseWriter, run *inflight, enc *encoder, ev infer.Event) {
	if run.req.stream {
		sw := g.newSSEWriter(ctx, w, run.prio, run.class, run.dispatch.ID())
		if g.relayChoices(ctx, sw, run, enc, ev) {
			sw.Close()
		} else {
			sw.Abort()
		}
		g.metrics.writes.WithLabelValues(urgencyLabel(run.prio.Urgency)).Observe(float64(sw.writes()))
		return
	}
	g.collectChoices(ctx, w, run, enc, ev)
}

// errBadChoice ends a request whose backend sent a token for a choice it
// was not asked for, or for one it had ended.
type errBadChoice struct {
	index, n uint32
	after    bool // the choice had ended
}

func (e *errBadChoice) Error() string {
	if e.after {
		return fmt.Sprintf("the worker sent a token of choice %d after its end", e.index)
	}
	return fmt.Sprintf("the worker sent choice %d of a request for %d", e.index, e.n)
}

// choiceOf checks the choice ev's token belongs to.
func choiceOf(run *inflight, ev infer.Event) (int, error) {
	if i, n := ev.Token.Index, run.req.job.N; i >= n {
		return 0, &errBadChoice{index: i, n: n}
	}
	return int(ev.Token.Index), nil
}

// choiceStream is one choice's state while its tokens stream: the
// logprobs of tokens whose text is held back, and where its next token's
// text starts (text completions' offsets).
type choiceStream struct {
	pending []infer.TokenLogprob
	offset  int
	ended   bool
}

// relayChoices is relay for several choices: each token goes out in a
// chunk of its own choice's index, a choice that ends sends its
// finish_reason chunk at once while the others go on, and the usage
// chunk, when asked for, counts every choice's tokens.
func (g *Gateway) relayChoices(ctx context.Context, sw *sseWriter, run *inflight, enc *encoder, ev infer.Event) bool {
	n := int(run.req.job.N)
	if enc.kind == kindChat {
		for i := range n {
			if sw.Write(enc.choiceOpening(i)) != nil {
				return false
			}
		}
	}
	cs := make([]choiceStream, n)
	first := true
	for ev.Done == nil {
		i, err := choiceOf(run, ev)
		if err == nil && cs[i].ended {
			err = &errBadChoice{index: uint32(i), n: uint32(n), after: true}
		}
		if err != nil {
			g.log.Error("malformed choices from backend", "request_id", run.dispatch.ID(), "err", err)
			run.adm.settle(ctx, run.tokens)
			return g.streamFailed(ctx, sw, run, &workerFailure{err: infer.Error{Code: infer.CodeInternal, Message: err.Error()}})
		}
		c := &cs[i]
		c.pending = append(c.pending, ev.Token.Logprobs...)
		if ev.Token.Text != "" {
			var event []byte
			event, c.offset = enc.choiceToken(i, ev.Token.Text, c.pending, c.offset)
			c.pending = nil
			if sw.Write(event) != nil {
				return false
			}
			if first {
				if sw.Flush() != nil {
					return false
				}
				first = false
			}
		}
		if r := ev.Token.FinishReason; r != "" {
			c.ended = true
			if sw.Write(enc.choiceFinish(i, r, c.pending, c.offset)) != nil {
				return false
			}
			c.pending = nil
		}
		if ev, err = g.nextHolding(ctx, run, sw); err != nil {
			run.adm.settle(ctx, run.tokens)
			return g.streamFailed(ctx, sw, run, err)
		}
	}
	run.adm.settle(ctx, run.tokens)
	// A choice the backend ended without saying why (it never should)
	// still gets its end.
	for i := range cs {
		if !cs[i].ended && sw.Write(enc.choiceFinish(i, finishReason(ev.Done), cs[i].pending, cs[i].offset)) != nil {
			return false
		}
	}
	if run.req.includeUsage {
		sw.Write(enc.usage(usageOf(ev.Done)))
	}
	return sw.Write(sseDone) == nil
}

// collectChoices is collect for several choices.
func (g *Gateway) collectChoices(ctx context.Context, w http.ResponseWriter, run *inflight, enc *encoder, ev infer.Event) {
	n := int(run.req.job.N)
	texts := make([]strings.Builder, n)
	lps := make([][]infer.TokenLogprob, n)
	reasons := make([]string, n)
	for ev.Done == nil {
		i, err := choiceOf(run, ev)
		if err != nil {
			g.log.Error("malformed choices from backend", "request_id", run.dispatch.ID(), "err", err)
			writeError(w, &workerFailure{err: infer.Error{Code: infer.CodeInternal, Message: err.Error()}})
			return
		}
		texts[i].WriteString(ev.Token.Text)
		lps[i] = append(lps[i], ev.Token.Logprobs...)
		if r := ev.Token.FinishReason; r != "" {
			reasons[i] = r
		}
		if ev, err = g.next(ctx, run); err != nil {
			err = deadlineCause(ctx, err)
			failed(ctx, err)
			writeError(w, err)
			return
		}
	}
	out := make([]string, n)
	for i := range n {
		out[i] = texts[i].String()
		if reasons[i] == "" {
			reasons[i] = finishReason(ev.Done)
		}
		if run.req.job.Logprobs && lps[i] == nil {
			lps[i] = []infer.TokenLogprob{}
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(enc.completeChoices(out, reasons, usageOf(ev.Done), lps))
}

// choiceOpening announces the assistant's role for choice i of a chat
// stream.
func (e *encoder) choiceOpening(i int) []byte {
	empty := ""
	return e.chunk([]chatChunkChoice{{Index: i, Delta: chatDelta{Role: "assistant", Content: &empty}}}, nil)
}

// choiceToken renders a token event of choice i, with the logprobs of
// its tokens since the last text, if any; offset is as for logprobs.
func (e *encoder) choiceToken(i int, text string, lps []infer.TokenLogprob, offset int) ([]byte, int) {
	chat, tl, next := e.logprobs(lps, offset)
	if e.kind == kindChat {
		return e.chunk([]chatChunkChoice{{Index: i, Delta: chatDelta{Content: &text}, Logprobs: chat}}, nil), next
	}
	return e.chunk([]textChoice{{Index: i, Text: text, Logprobs: tl}}, nil), next
}

// choiceFinish renders the event that ends choice i.
func (e *encoder) choiceFinish(i int, reason string, lps []infer.TokenLogprob, offset int) []byte {
	chat, tl, _ := e.logprobs(lps, offset)
	if e.kind == kindChat {
		return e.chunk([]chatChunkChoice{{Index: i, FinishReason: &reason, Logprobs: chat}}, nil)
	}
	return e.chunk([]textChoice{{Index: i, FinishReason: &reason, Logprobs: tl}}, nil)
}

// completeChoices renders the whole non-streamed answer of several
// choices; lps[i] is nil unless the request asked for logprobs.
func (e *encoder) completeChoices(texts, reasons []string, u usage, lps [][]infer.TokenLogprob) []byte {
	r := fullResponse{envelope: e.env, Usage: u}
	if e.kind == kindChat {
		r.Object = "chat.completion"
		cs := make([]chatChoice, len(texts))
		for i := range texts {
			chat, _, _ := e.logprobs(lps[i], 0)
			cs[i] = chatChoice{Index: i, Message: chatMessageOut{Role: "assistant", Content: texts[i]}, Logprobs: chat, FinishReason: reasons[i]}
		}
		r.Choices = cs
	} else {
		cs := make([]textChoice, len(texts))
		for i := range texts {
			_, tl, _ := e.logprobs(lps[i], 0)
			cs[i] = textChoice{Index: i, Text: texts[i], Logprobs: tl, FinishReason: &reasons[i]}
		}
		r.Choices = cs
	}
	b, _ := json.Marshal(r)
	return append(b, '\n')
}
