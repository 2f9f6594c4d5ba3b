package engine

import (
	"fmt"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"h3infer/infer"
	"h3infer/transport"
	"h3infer/workerconf"
)

// tracedLoop is testLoop with a tracer that records every span in memory.
func tracedLoop(t *testing.T, slots int) (*workerLoop, *recorder, chan inbound, *tracetest.SpanRecorder) {
	t.Helper()
	w, rec, inbox := testLoop(t, slots, workerconf.DefaultKVCacheBytes)
	spans := tracetest.NewSpanRecorder()
	w.tracer = sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans)).Tracer(tracerName)
	return w, rec, inbox, spans
}

// gatewaySpan is the span context a gateway would name in TraceParent for
// request id.
func gatewaySpan(id uint64) (trace.SpanContext, string) {
	var tid trace.TraceID
	var sid trace.SpanID
	tid[0], tid[15] = 0xab, byte(id)
	sid[0], sid[7] = 0xcd, byte(id)
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid, TraceFlags: trace.FlagsSampled, Remote: true})
	return sc, fmt.Sprintf("00-%s-%s-01", tid, sid)
}

func attr(s sdktrace.ReadOnlySpan, key string) (attribute.Value, bool) {
	for _, kv := range s.Attributes() {
		if string(kv.Key) == key {
			return kv.Value, true
		}
	}
	return attribute.Value{}, false
}

func hasEvent(s sdktrace.ReadOnlySpan, name string) bool {
	for _, e := range s.Events() {
		if e.Name == name {
			return true
		}
	}
	return false
}

// In the batched loop every sequence gets its own prefill span and then a
// decode span that lasts until it finishes or is cancelled, both children
// of the gateway's span named in its Submit, however the sequences share
// decode steps.
func TestBatchedSequenceSpans(t *testing.T) {
	w, rec, inbox, spans := tracedLoop(t, 4)
	long := infer.Request{Model: "demo", Prompt: "The ", Temperature: 1, Seed: 1, HasSeed: true}
	requireLong(t, loadTestModel(t), &long)
	subs := map[uint64]infer.Request{
		1: long,
		2: {Model: "demo", Prompt: "A worker ", MaxTokens: 30},
		3: {Model: "demo", Prompt: "In", MaxTokens: 20, Urgency: 1},
	}
	for id := uint64(1); id <= 3; id++ {
		s := subs[id]
		_, s.TraceParent = gatewaySpan(id)
		inbox <- submit(id, s)
	}
	// Request 1 is cancelled mid-decode, while the others share its steps.
	rec.onToken = func(id uint64) {
		if id == 1 && rec.tokens[1] == 8 {
			inbox <- inbound{typ: transport.FrameCancel, id: 1}
		}
	}
	runUntilIdle(t, w, inbox, 1000)

	ended := spans.Ended()
	if started := len(spans.Started()); started != len(ended) {
		t.Errorf("%d spans started, %d ended", started, len(ended))
	}
	byTrace := map[trace.TraceID][]sdktrace.ReadOnlySpan{}
	for _, s := range ended {
		byTrace[s.SpanContext().TraceID()] = append(byTrace[s.SpanContext().TraceID()], s)
	}
	batched := false
	for id := uint64(1); id <= 3; id++ {
		parent, _ := gatewaySpan(id)
		got := byTrace[parent.TraceID()]
		if len(got) != 2 || got[0].Name() != phasePrefill || got[1].Name() != phaseDecode {
			var names []string
			for _, s := range got {
				names = append(names, s.Name())
			}
			t.Fatalf("request %d: spans %v, want [prefill decode]", id, names)
		}
		prefill, decode := got[0], got[1]
		for _, s := range got {
			if s.Parent().SpanID() != parent.SpanID() {
				t.Errorf("request %d: %s span's parent %s, want the gateway's %s", id, s.Name(), s.Parent().SpanID(), parent.SpanID())
			}
		}
		if decode.StartTime().Before(prefill.EndTime()) {
			t.Errorf("request %d: decode started before prefill ended", id)
		}
		if !hasEvent(prefill, "prefill_started") {
			t.Errorf("request %d: prefill span lacks prefill_started", id)
		}
		if v, _ := attr(prefill, "h3infer.prompt_tokens"); v.AsInt64() <= 0 {
			t.Errorf("request %d: prefill h3infer.prompt_tokens = %v", id, v.AsInt64())
		}
		if v, _ := attr(decode, "h3infer.batch_rows"); v.AsInt64() > 1 {
			batched = true
		}
		if id == 1 {
			if !hasEvent(decode, "cancelled") {
				t.Errorf("request 1: cancelled, but its decode span has no cancelled event")
			}
			continue
		}
		done := rec.done[id]
		reason, _ := attr(decode, "h3infer.finish_reason")
		tokens, _ := attr(decode, "h3infer.completion_tokens")
		if reason.AsString() != done.FinishReason || tokens.AsInt64() != int64(done.CompletionTokens) {
			t.Errorf("request %d: decode span says %q after %d tokens, the Done frame %q after %d",
				id, reason.AsString(), tokens.AsInt64(), done.FinishReason, done.CompletionTokens)
		}
	}
	if !batched {
		t.Error("no decode span joined a batch of more than one row; the test needs overlap")
	}
}

// A worker that stops ends the spans of the sequences it drops.
func TestCloseAllEndsSpans(t *testing.T) {
	w, _, inbox, spans := tracedLoop(t, 2)
	s := infer.Request{Model: "demo", Prompt: "The ", MaxTokens: 200}
	_, s.TraceParent = gatewaySpan(9)
	inbox <- submit(9, s)
	for range 5 {
		if err := w.round(inbox); err != nil {
			t.Fatal(err)
		}
	}
	w.closeAll()
	ended := spans.Ended()
	if len(ended) != 2 || ended[1].Name() != phaseDecode || !hasEvent(ended[1], "worker stopped") {
		t.Fatalf("after closeAll: %d spans ended, want prefill and a decode marked worker stopped", len(ended))
	}
}
