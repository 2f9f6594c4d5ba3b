package engine

import (
	"strings"
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/transport"
)

// gatedModel holds the encoding of large prompts until its gate opens, as
// a slow tokenizer or chat template would.
type gatedModel struct {
	Model
	gate chan struct{}
}

func (g gatedModel) Encode(text string) []int {
	g.wait(text)
	return g.Model.Encode(text)
}

func (g gatedModel) EncodeSpecial(text string) []int {
	g.wait(text)
	return g.Model.EncodeSpecial(text)
}

// wait holds a large text until the gate opens, or 10 s at most, so that
// a loop that encodes it on its own thread fails the test rather than
// hanging it.
func (g gatedModel) wait(text string) {
	if len(text) > prepareInline {
		select {
		case <-g.gate:
		case <-time.After(10 * time.Second):
		}
	}
}

// A large prompt is rendered and encoded beside the loop: while it is,
// other requests start and finish, a cancel drops it without an answer,
// and once it is ready the request is answered as if admitted at once
// (here with the context-length refusal its size earns).
func TestLargePromptPreparedAside(t *testing.T) {
	gate := make(chan struct{})
	w, rec, inbox := testLoopOf(t, 4, 1<<30, gatedModel{loadTestModel(t), gate})
	stop := make(chan struct{})
	w.inbox, w.stop = inbox, stop
	t.Cleanup(func() {
		close(stop)
		w.preparers.Wait()
	})
	big := strings.Repeat("the gateway ", 2*prepareInline/12)
	for _, in := range []inbound{
		submit(2, infer.Request{Model: "demo", Prompt: big, MaxTokens: 4}),
		submit(3, infer.Request{Model: "demo", Messages: []infer.ChatMessage{{Role: "user", Content: big}}, MaxTokens: 4}),
		submit(1, infer.Request{Model: "demo", Prompt: "The worker", MaxTokens: 8}),
	} {
		if err := w.handle(in); err != nil {
			t.Fatal(err)
		}
	}
	if len(w.preparing) != 2 || len(w.byID) != 1 {
		t.Fatalf("%d preparing, %d running; want the two large prompts aside and the small one admitted", len(w.preparing), len(w.byID))
	}
	if err := w.handle(submit(4, infer.Request{Model: "demo", Prompt: "x", MaxTokens: 1})); err != nil {
		t.Fatal(err)
	}
	if err := w.handle(submit(5, infer.Request{Model: "demo", Prompt: "x", MaxTokens: 1})); err != nil {
		t.Fatal(err)
	}
	if e, ok := rec.errs[5]; !ok || !strings.Contains(e.Message, "all 4 slots") {
		t.Errorf("fifth request: %+v; want refused, the prompts being prepared holding their slots", e)
	}
	for range 64 {
		if _, ok := rec.done[1]; ok {
			break
		}
		if err := w.round(inbox); err != nil {
			t.Fatal(err)
		}
	}
	if d, ok := rec.done[1]; !ok || d.CompletionTokens != 8 {
		t.Fatalf("the small request did not finish while the large prompts were encoded: %+v", d)
	}
	if err := w.handle(inbound{typ: transport.FrameCancel, id: 3}); err != nil {
		t.Fatal(err)
	}
	close(gate)
	deadline := time.After(30 * time.Second)
	for len(w.preparing) > 0 || len(rec.errs) < 2 {
		select {
		case in := <-inbox:
			if err := w.handle(in); err != nil {
				t.Fatal(err)
			}
		case <-deadline:
			t.Fatalf("the prepared prompts never came back: %d preparing, errors %+v", len(w.preparing), rec.errs)
		}
	}
	w.preparers.Wait()
	for len(inbox) > 0 {
		if err := w.handle(<-inbox); err != nil {
			t.Fatal(err)
		}
	}
	if e := rec.errs[2]; e.Code != infer.CodeContextLength {
		t.Errorf("large prompt: %+v; want the context-length refusal", e)
	}
	if e, ok := rec.errs[3]; ok {
		t.Errorf("cancelled while prepared, it was answered: %+v", e)
	}
	if _, ok := rec.done[3]; ok || len(w.byID) != 0 {
		t.Errorf("cancelled while prepared, it ran: %d running", len(w.byID))
	}
}
