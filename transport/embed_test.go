package transport

import (
	"bytes"
	"math"
	"reflect"
	"strings"
	"testing"

	"h3infer/infer"
	"h3infer/priority"
)

func TestEmbedRoundTrip(t *testing.T) {
	reqs := []infer.Request{
		{Model: "enc", Urgency: 2, Class: priority.Urgent, TraceParent: "00-abc-01", Embed: &infer.EmbedRequest{Texts: []string{"hello", "", "wörld"}, Dimensions: 16}},
		{Model: "enc", Urgency: 7, Class: priority.Bulk, Embed: &infer.EmbedRequest{Tokens: [][]uint32{{1, 2, 3}, {math.MaxUint32}}}},
	}
	for _, want := range reqs {
		got, err := DecodeEmbed(AppendEmbed(nil, &want))
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("embed: got %+v, %v, want %+v", got, err, want)
		}
	}
	embs := []infer.Embedding{
		{Index: 0, Vectors: [][]float32{{1, -2.5, float32(math.Inf(1))}}},
		{Index: 7, Vectors: [][]float32{{0.25, 0.5}, {-1, 1e-30}, {3, 4}}},
	}
	for _, want := range embs {
		got, err := DecodeEmbedding(AppendEmbedding(nil, &want))
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("embedding: got %+v, %v, want %+v", got, err, want)
		}
	}
	ready := Ready{PID: 1, Slots: 4, Models: []infer.ModelInfo{
		{Name: "demo", ContextLength: 2048},
		{Name: "enc", ContextLength: 512, Encoder: true, EmbeddingSize: 64, Matryoshka: true},
		{Name: "enc2", ContextLength: 128, Encoder: true},
	}}
	got, err := DecodeReady(AppendReady(nil, &ready))
	if err != nil || !reflect.DeepEqual(got, ready) {
		t.Errorf("ready: got %+v, %v, want %+v", got, err, ready)
	}
	// Without an encoder the encoding is the one from before encoders.
	plain := Ready{PID: 1, Models: []infer.ModelInfo{{Name: "demo", ContextLength: 2048}}}
	if n, want := len(AppendReady(nil, &plain)), 1+1+1+1+1+4+2; n != want {
		t.Errorf("a Ready of one decoder takes %d bytes, want %d", n, want)
	}
}

// TestEmbedMalformed: the decoders refuse what a sound peer never sends,
// each with a reason.
func TestEmbedMalformed(t *testing.T) {
	good := AppendEmbed(nil, &infer.Request{Model: "m", Embed: &infer.EmbedRequest{Tokens: [][]uint32{{1}}}})
	tooMany := AppendEmbed(nil, &infer.Request{Model: "m", Embed: &infer.EmbedRequest{Texts: make([]string, infer.MaxEmbedInputs+1)}})
	tests := map[string]struct {
		decode func([]byte) error
		p      []byte
		want   string
	}{
		"embed flags":         {decodeEmbed, append([]byte{0x80}, good[1:]...), "unknown flags"},
		"embed no inputs":     {decodeEmbed, AppendEmbed(nil, &infer.Request{Model: "m", Embed: &infer.EmbedRequest{Texts: []string{}}}), "0 inputs"},
		"embed too many":      {decodeEmbed, tooMany, "2049 inputs"},
		"embed empty tokens":  {decodeEmbed, AppendEmbed(nil, &infer.Request{Model: "m", Embed: &infer.EmbedRequest{Tokens: [][]uint32{{}}}}), "input 0: 0 tokens"},
		"embed trailing":      {decodeEmbed, append(good, 0), "trailing"},
		"embed truncated":     {decodeEmbed, good[:len(good)-1], "cannot fit"},
		"embedding none":      {decodeEmbedding, []byte{0, 0, 4}, "0 vectors"},
		"embedding short":     {decodeEmbedding, []byte{0, 1, 2, 0, 0, 0, 0}, "1 vectors of 2 values in 4 bytes"},
		"embedding past end":  {decodeEmbedding, AppendEmbedding(nil, &infer.Embedding{Index: infer.MaxEmbedInputs, Vectors: [][]float32{{1}}}), "past the 2048 inputs"},
		"embedding huge dims": {decodeEmbedding, []byte{0, 1, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0, 0}, "in 4 bytes"},
		"ready encoder flags": {decodeReady, append(AppendReady(nil, &Ready{Models: []infer.ModelInfo{{Name: "a"}}}), 0x04, 0), "flags"},
		"ready size alone":    {decodeReady, append(AppendReady(nil, &Ready{Models: []infer.ModelInfo{{Name: "a"}}}), 0, 8), "embedding size 8"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := tc.decode(tc.p)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
}

func decodeEmbed(p []byte) error     { _, err := DecodeEmbed(p); return err }
func decodeEmbedding(p []byte) error { _, err := DecodeEmbedding(p); return err }
func decodeReady(p []byte) error     { _, err := DecodeReady(p); return err }

// TestEmbeddingOverRing: an embedding request crosses the ring as
// FrameEmbed, opened either way (Open, and OpenSink as the scheduler
// opens calls), and its vectors come back as Embedding events before
// Done.
func TestEmbeddingOverRing(t *testing.T) {
	for _, sink := range []bool{false, true} {
		t.Run(map[bool]string{false: "open", true: "sink"}[sink], func(t *testing.T) { embeddingOverRing(t, sink) })
	}
}

func embeddingOverRing(t *testing.T, sink bool) {
	checkGoroutines(t)
	gwSeg, wkSeg := newPair(t, 64<<10)
	g := NewGatewayEnd(gwSeg, GatewayEndConfig{})
	w := NewWorkerEnd(wkSeg)
	runErr := make(chan error, 1)
	go func() { runErr <- g.Run() }()
	req := &infer.Request{Model: "enc", Embed: &infer.EmbedRequest{Texts: []string{"a", "b"}}}
	var c *Call
	var err error
	if sink {
		c, err = g.OpenSink(9, req, &infer.Sink{})
	} else {
		c, err = g.Open(9, req)
	}
	if err != nil {
		t.Fatal(err)
	}
	f, err := w.Recv()
	if err != nil || f.Type != FrameEmbed || f.ID != 9 {
		t.Fatalf("worker got %v %d, %v; want an embed frame for 9", f.Type, f.ID, err)
	}
	got, err := DecodeEmbed(f.Payload)
	if err != nil || !reflect.DeepEqual(got.Embed, req.Embed) {
		t.Fatalf("worker decoded %+v, %v", got.Embed, err)
	}
	want := []infer.Embedding{{Index: 0, Vectors: [][]float32{{1, 0}}}, {Index: 1, Vectors: [][]float32{{0, 1}}}}
	for _, e := range want {
		if err := w.SendEmbedding(9, e); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.SendDone(9, infer.Done{PromptTokens: 2}); err != nil {
		t.Fatal(err)
	}
	for i, e := range want {
		ev := <-c.Events()
		if ev.Embedding == nil || !reflect.DeepEqual(*ev.Embedding, e) {
			t.Fatalf("event %d: got %+v, want embedding %+v", i, ev, e)
		}
	}
	if ev := <-c.Events(); ev.Done == nil || ev.Done.PromptTokens != 2 {
		t.Fatalf("got %+v, want Done with 2 prompt tokens", ev)
	}
	w.Close()
	<-runErr
}

func FuzzDecodeEmbed(f *testing.F) {
	f.Add(AppendEmbed(nil, &infer.Request{Model: "enc", Embed: &infer.EmbedRequest{Texts: []string{"hello"}, Dimensions: 8}}))
	f.Add(AppendEmbed(nil, &infer.Request{Model: "enc", Embed: &infer.EmbedRequest{Tokens: [][]uint32{{1, 2}, {3}}}}))
	f.Fuzz(func(t *testing.T, p []byte) {
		r, err := DecodeEmbed(p)
		if err != nil {
			return
		}
		if got, err := DecodeEmbed(AppendEmbed(nil, &r)); err != nil || !reflect.DeepEqual(got, r) {
			t.Fatalf("re-encoding %+v gave %+v, %v", r, got, err)
		}
	})
}

func FuzzDecodeEmbedding(f *testing.F) {
	f.Add(AppendEmbedding(nil, &infer.Embedding{Index: 3, Vectors: [][]float32{{1, 2}, {3, 4}}}))
	f.Fuzz(func(t *testing.T, p []byte) {
		e, err := DecodeEmbedding(p)
		if err != nil {
			return
		}
		// Compared as bytes: a NaN is not equal to itself.
		b := AppendEmbedding(nil, &e)
		again, err := DecodeEmbedding(b)
		if err != nil || !bytes.Equal(AppendEmbedding(nil, &again), b) {
			t.Fatalf("%+v does not survive re-encoding: %+v, %v", e, again, err)
		}
	})
}

// TestSendEmbeddings: one publish carries several requests' vectors and
// the Done of those it finishes; each call gets its own, in order.
func TestSendEmbeddings(t *testing.T) {
	checkGoroutines(t)
	gwSeg, wkSeg := newPair(t, 64<<10)
	g := NewGatewayEnd(gwSeg, GatewayEndConfig{})
	w := NewWorkerEnd(wkSeg)
	runErr := make(chan error, 1)
	go func() { runErr <- g.Run() }()
	var calls []*Call
	for id := uint64(1); id <= 2; id++ {
		c, err := g.Open(id, &infer.Request{Model: "enc", Embed: &infer.EmbedRequest{Texts: []string{"a", "b"}}})
		if err != nil {
			t.Fatal(err)
		}
		calls = append(calls, c)
	}
	v := func(x float32) [][]float32 { return [][]float32{{x, -x}} }
	err := w.SendEmbeddings([]EmbeddingOut{
		{ID: 1, Embedding: infer.Embedding{Index: 0, Vectors: v(1)}},
		{ID: 2, Embedding: infer.Embedding{Index: 0, Vectors: [][]float32{{2, -2}, {3, -3}}}, Done: &infer.Done{PromptTokens: 2}},
		{ID: 1, Embedding: infer.Embedding{Index: 1, Vectors: v(4)}, Done: &infer.Done{PromptTokens: 7}},
	})
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range calls {
		var vecs [][]float32
		var done *infer.Done
		for ev := range c.Events() {
			if ev.Embedding != nil {
				vecs = append(vecs, ev.Embedding.Vectors...)
			}
			done = ev.Done
		}
		want := [][][]float32{{{1, -1}, {4, -4}}, {{2, -2}, {3, -3}}}[i]
		if !reflect.DeepEqual(vecs, want) || done == nil || done.PromptTokens != []uint32{7, 2}[i] {
			t.Errorf("call %d: %v then %+v", i+1, vecs, done)
		}
	}
	w.Close()
	<-runErr
}
