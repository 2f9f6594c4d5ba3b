package backend

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"h3infer/infer"
	"h3infer/transport"
)

// SyntheticDir is the model "directory" that selects the synthetic model:
// no ONNX Runtime and no model cost, a token as fast as the ring takes it.
// "synthetic:2ms" paces each sequence at one token per 2ms instead. It
// exists to measure the gateway's own overhead (h3infer bench); a worker
// serves either synthetic models only or real ones only.
const SyntheticDir = "synthetic"

// SyntheticToken is the text of every synthetic token. The comparison
// server of the bench tooling writes the same text, so both send the same
// bytes.
const SyntheticToken = " tok"

// syntheticContextLength is what a synthetic model reports; prompts are
// never tokenized, so it only bounds max_tokens.
const syntheticContextLength = 1 << 20

// ParseSynthetic reports whether dir names the synthetic model and, if so,
// its per-token interval (0: unpaced).
func ParseSynthetic(dir string) (interval time.Duration, ok bool, err error) {
	rest, found := strings.CutPrefix(dir, SyntheticDir)
	if !found || (rest != "" && rest[0] != ':') {
		return 0, false, nil
	}
	if rest == "" {
		return 0, true, nil
	}
	interval, err = time.ParseDuration(rest[1:])
	if err != nil || interval < 0 {
		return 0, true, fmt.Errorf("synthetic model %q: want synthetic or synthetic:INTERVAL such as synthetic:2ms", dir)
	}
	return interval, true, nil
}

// syntheticOnly reports whether every model of cfg is synthetic; mixing
// is refused.
func syntheticOnly(cfg WorkerConfig) (bool, error) {
	n := 0
	for _, m := range cfg.Models {
		_, ok, err := ParseSynthetic(m.Dir)
		if err != nil {
			return false, err
		}
		if ok {
			n++
		}
	}
	if n != 0 && n != len(cfg.Models) {
		return false, fmt.Errorf("worker: synthetic and real models cannot share a worker")
	}
	return n != 0, nil
}

// syntheticSeq is one request of the synthetic loop.
type syntheticSeq struct {
	id       uint64
	prompt   uint32 // prompt "tokens": whitespace-separated words
	left     uint32
	sent     uint32
	interval time.Duration
	due      time.Time
}

// runSynthetic is the worker loop for synthetic models: the same ring
// protocol as the real loop (ready, submit, cancel, token, done, stats)
// with each token costing nothing. It runs up to cfg.Slots sequences.
func runSynthetic(ctx context.Context, cfg WorkerConfig, end *transport.WorkerEnd, log *slog.Logger) error {
	intervals := map[string]time.Duration{}
	ready := transport.Ready{PID: uint32(os.Getpid()), Slots: uint32(cfg.Slots)}
	for _, m := range cfg.Models {
		iv, _, _ := ParseSynthetic(m.Dir) // checked by syntheticOnly
		intervals[m.Name] = iv
		ready.Models = append(ready.Models, infer.ModelInfo{Name: m.Name, ContextLength: syntheticContextLength})
	}
	if err := end.SendReady(ready); err != nil {
		return closedOK(fmt.Errorf("worker: send ready: %w", err))
	}
	log.Info("synthetic worker ready", "pid", ready.PID, "slots", cfg.Slots)

	inbox := make(chan inbound, 64)
	recvErr := make(chan error, 1)
	stopRecv := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { receive(end, inbox, recvErr, stopRecv) })
	defer func() {
		end.Close()
		close(stopRecv)
		wg.Wait()
	}()

	var (
		active []*syntheticSeq
		stats  transport.Stats
	)
	byID := map[uint64]*syntheticSeq{}
	remove := func(s *syntheticSeq) {
		delete(byID, s.id)
		for i, a := range active {
			if a == s {
				active = append(active[:i], active[i+1:]...)
				break
			}
		}
	}
	handle := func(in inbound) error {
		switch in.typ {
		case transport.FrameSubmit:
			reject := func(code, msg string) error {
				return end.SendError(in.id, infer.Error{Code: code, Message: msg})
			}
			iv, known := intervals[in.submit.Model]
			switch {
			case in.err != nil:
				return reject(infer.CodeInvalidRequest, "malformed submit: "+in.err.Error())
			case byID[in.id] != nil:
				return reject(infer.CodeInvalidRequest, fmt.Sprintf("request id %d is already running", in.id))
			case len(active) >= cfg.Slots:
				return reject(infer.CodeInternal, fmt.Sprintf("worker busy: all %d slots in use", cfg.Slots))
			case !known:
				return reject(infer.CodeModelNotFound, fmt.Sprintf("model %q is not served by this worker", in.submit.Model))
			}
			words := len(strings.Fields(in.submit.Prompt))
			for _, m := range in.submit.Messages {
				words += len(strings.Fields(m.Content))
			}
			n := in.submit.MaxTokens
			if n == 0 {
				n = 16
			}
			s := &syntheticSeq{id: in.id, prompt: uint32(words), left: n, interval: iv, due: time.Now()}
			active = append(active, s)
			byID[in.id] = s
			stats.SequencesStarted++
		case transport.FrameCancel:
			if s := byID[in.id]; s != nil {
				remove(s)
				stats.SequencesCancelled++
			}
		}
		return nil
	}
	// drain handles every frame already waiting, without blocking.
	drain := func() error {
		for {
			select {
			case in := <-inbox:
				if err := handle(in); err != nil {
					return err
				}
			default:
				return nil
			}
		}
	}
	// due is always ready: the wake of a pass with a token already due.
	due := make(chan time.Time)
	close(due)
	ticker := time.NewTicker(cfg.StatsInterval)
	defer ticker.Stop()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		// The pool kills a worker whose heartbeat stands still. Every pass
		// beats: idle, the stats ticker wakes the loop at least every
		// stats interval; busy, each token's wake-up does.
		end.Beat()
		// Emit every due token, then sleep until the next is due or a
		// frame arrives.
		now := time.Now()
		var next time.Time
		for _, s := range append([]*syntheticSeq(nil), active...) {
			if s.due.After(now) {
				if next.IsZero() || s.due.Before(next) {
					next = s.due
				}
				continue
			}
			if err := end.SendToken(s.id, infer.Token{Count: 1, Text: SyntheticToken}); err != nil {
				return closedOK(err)
			}
			stats.TokensGenerated++
			s.sent++
			s.left--
			if s.left == 0 {
				remove(s)
				stats.SequencesFinished++
				if err := end.SendDone(s.id, infer.Done{FinishReason: infer.FinishLength, PromptTokens: s.prompt, CompletionTokens: s.sent}); err != nil {
					return closedOK(err)
				}
				continue
			}
			s.due = s.due.Add(s.interval)
			if next.IsZero() || s.due.Before(next) {
				next = s.due
			}
		}
		var wake <-chan time.Time
		switch {
		case len(active) == 0:
		case !next.After(time.Now()):
			// Something is due already: take in all that is waiting, as
			// the real loop drains its inbox every round (taking one frame
			// per pass held a burst of submits back a whole pass each),
			// then serve the rest without blocking.
			if err := drain(); err != nil {
				return closedOK(err)
			}
			wake = due
		default:
			timer.Reset(time.Until(next))
			wake = timer.C
		}
		select {
		case in := <-inbox:
			if err := handle(in); err != nil {
				return closedOK(err)
			}
			if err := drain(); err != nil {
				return closedOK(err)
			}
		case <-wake:
		case err := <-recvErr:
			return closedOK(err)
		case <-ticker.C:
			stats.Active = uint32(len(active))
			if err := end.SendStats(stats); err != nil {
				return closedOK(err)
			}
		case <-ctx.Done():
			return nil
		}
	}
}
