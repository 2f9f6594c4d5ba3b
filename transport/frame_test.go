package transport

import (
	"bytes"
	"errors"
	"math"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"

	"h3infer/infer"
	"h3infer/priority"
)

func sampleSubmits() map[string]infer.Request {
	return map[string]infer.Request{
		"zero":   {},
		"prompt": {Model: "demo", Prompt: "Once upon a time", MaxTokens: 64, Temperature: 0.7, TopP: 0.9, Urgency: 3},
		"sampling": {
			Model: "demo", Prompt: "p", TopK: 40, MinP: 0.05, PresencePenalty: -2, FrequencyPenalty: 1.5, RepetitionPenalty: 1.1,
			LogitBias: []infer.LogitBias{{Token: 0, Bias: -100}, {Token: 50256, Bias: 2.5}, {Token: math.MaxUint32, Bias: 100}},
		},
		"chat": {
			Model: "demo",
			Messages: []infer.ChatMessage{
				{Role: "system", Content: "Be brief."},
				{Role: "user", Content: "héllo, wörld ✓"},
				{Role: "assistant", Content: ""},
			},
			Seed: 1<<63 + 5, HasSeed: true, IgnoreEOS: true,
			Stop:        []string{"\n\n", "END", ""},
			Urgency:     0,
			TraceParent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
		},
		"logprobs":    {Model: "demo", Prompt: "p", Logprobs: true},
		"json_object": {Model: "demo", Prompt: "p", ResponseFormat: `{"type":"json_object"}`},
		"json_schema": {Model: "demo", Messages: []infer.ChatMessage{{Role: "user", Content: "hi"}}, TraceParent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
			ResponseFormat: `{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","properties":{"a":{"type":"string"}},"required":["a"]}}}`},
		"top_logprobs": {Model: "demo", Prompt: "p", Temperature: 0.5, Logprobs: true, TopLogprobs: infer.MaxTopLogprobs},
		"choices":      {Model: "demo", Prompt: "p", Temperature: 1, Seed: 3, HasSeed: true, N: infer.MaxChoices, ResponseFormat: `{"type":"json_object"}`},
		"tools": {Model: "demo", Messages: []infer.ChatMessage{
			{Role: "user", Content: "weather?"},
			{Role: "assistant", ToolCalls: []infer.ToolCall{{ID: "call_1", Name: "w", Arguments: `{"c":"Oslo"}`}, {ID: "call_2", Name: "t", Arguments: `{}`}}},
			{Role: "tool", Content: "4", ToolCallID: "call_1"},
		}, Tools: `[{"type":"function","function":{"name":"w"}}]`, ToolChoice: infer.ToolFunction, ToolName: "w", SerialToolCalls: true},
		"tool history only": {Model: "demo", Messages: []infer.ChatMessage{{Role: "tool", Content: "4", ToolCallID: "call_1"}}},
		"tool choice only":  {Model: "demo", Prompt: "p", ToolChoice: infer.ToolNone},
		"choices and tools": {Model: "demo", Prompt: "p", N: 2, Tools: `[{"type":"function","function":{"name":"w"}}]`, ToolChoice: infer.ToolRequired},
		"extremes": {
			Prompt: strings.Repeat("x", 70000), MaxTokens: math.MaxUint32,
			Temperature: float32(math.Inf(1)), TopP: -0.0, Seed: math.MaxUint64, Urgency: priority.Least, Class: priority.Bulk,
		},
	}
}

func TestSubmitRoundTrip(t *testing.T) {
	for name, want := range sampleSubmits() {
		t.Run(name, func(t *testing.T) {
			got, err := DecodeSubmit(AppendSubmit(nil, &want))
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("got %+v, want %+v", got, want)
			}
		})
	}
}

// sampleLogprobs is the logprob entry of a token whose text is text, with
// top entries when top > 0.
func sampleLogprobs(text string, top int) infer.TokenLogprob {
	lp := infer.TokenLogprob{Token: text, Logprob: -0.25}
	for i := range top {
		lp.Top = append(lp.Top, infer.TopLogprob{Token: string(rune('a' + i)), Logprob: -float32(i)})
	}
	return lp
}

func TestMessageRoundTrip(t *testing.T) {
	maxTop := sampleLogprobs("\xe2", infer.MaxTopLogprobs)
	maxTop.Top[3] = infer.TopLogprob{Token: "", Logprob: float32(math.Inf(-1))}
	tokens := []infer.Token{
		{}, {Count: 1, Text: "hello"}, {Count: math.MaxUint32, Text: "\xe2\x9c"},
		{Count: 1, Text: "hi", Logprobs: []infer.TokenLogprob{sampleLogprobs("hi", 0)}},
		// Text held back, and an end token whose piece is empty.
		{Count: 1, Logprobs: []infer.TokenLogprob{maxTop}},
		{Count: 1, Logprobs: []infer.TokenLogprob{{Logprob: float32(math.Inf(-1)), Top: []infer.TopLogprob{{Token: "x", Logprob: 0}}}}},
		{Count: 3, Text: "abc", Logprobs: []infer.TokenLogprob{sampleLogprobs("a", 2), sampleLogprobs("b", 0), sampleLogprobs("c", 1)}},
		{Count: 2, Text: "x", ToolCalls: []infer.ToolCallDelta{{Index: 0, ID: "call_1", Name: "w"}, {Index: 0, Arguments: `{"c":1}`}}},
		{Count: 1, Logprobs: []infer.TokenLogprob{sampleLogprobs("}", 1)}, ToolCalls: []infer.ToolCallDelta{{Index: 7, Arguments: "{}"}}},
		// A choice's tool calls, and its end, after its index.
		{Count: 1, Index: 2, FinishReason: infer.FinishToolCalls, ToolCalls: []infer.ToolCallDelta{{Index: 1, ID: "call_3", Name: "w"}}},
	}
	for _, want := range tokens {
		got, err := DecodeToken(AppendToken(nil, &want))
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("token: got %+v, %v, want %+v", got, err, want)
		}
	}
	// Without logprobs a token costs one byte more than its count and
	// text.
	if got := len(AppendToken(nil, &infer.Token{Count: 1, Text: "hello"})); got != 1+1+5+1 {
		t.Errorf("a token without logprobs takes %d bytes, want 8", got)
	}
	dones := []infer.Done{{}, {FinishReason: infer.FinishStop, PromptTokens: 12, CompletionTokens: 345}, {FinishReason: infer.FinishLength, PromptTokens: math.MaxUint32}}
	for _, want := range dones {
		got, err := DecodeDone(AppendDone(nil, &want))
		if err != nil || got != want {
			t.Errorf("done: got %+v, %v, want %+v", got, err, want)
		}
	}
	errs := []infer.Error{{}, {Code: infer.CodeContextLength, Message: "prompt is 5000 tokens, context is 2048"}}
	for _, want := range errs {
		got, err := DecodeError(AppendError(nil, &want))
		if err != nil || got != want {
			t.Errorf("error: got %+v, %v, want %+v", got, err, want)
		}
	}
	readies := []Ready{{}, {PID: 4242, Slots: 8, SlotsFit: 128, Models: []infer.ModelInfo{{Name: "demo", ContextLength: 2048}, {Name: "", ContextLength: 0}}}}
	for _, want := range readies {
		got, err := DecodeReady(AppendReady(nil, &want))
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("ready: got %+v, %v, want %+v", got, err, want)
		}
	}
	stats := []Stats{{}, {TokensGenerated: math.MaxUint64, SequencesStarted: 1, SequencesFinished: 2, SequencesCancelled: 3, Active: math.MaxUint32}}
	for _, want := range stats {
		got, err := DecodeStats(AppendStats(nil, &want))
		if err != nil || got != want {
			t.Errorf("stats: got %+v, %v, want %+v", got, err, want)
		}
	}
}

func TestFrameRoundTrip(t *testing.T) {
	var b []byte
	want := []Frame{
		{Type: FrameSubmit, ID: 1, Payload: []byte("abc")},
		{Type: FrameCancel, ID: math.MaxUint64, Payload: []byte{}},
		{Type: FrameStats, ID: 0, Payload: bytes.Repeat([]byte{0xff}, 1000)},
	}
	for _, f := range want {
		var err error
		if b, err = AppendFrame(b, f); err != nil {
			t.Fatal(err)
		}
	}
	for i, w := range want {
		f, n, err := DecodeFrame(b)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if f.Type != w.Type || f.ID != w.ID || !bytes.Equal(f.Payload, w.Payload) {
			t.Errorf("frame %d: got %v %d %d bytes, want %v %d %d bytes", i, f.Type, f.ID, len(f.Payload), w.Type, w.ID, len(w.Payload))
		}
		b = b[n:]
	}
	if len(b) != 0 {
		t.Errorf("%d bytes left over", len(b))
	}
}

func TestDecodeRejects(t *testing.T) {
	valid := AppendSubmit(nil, &infer.Request{Model: "m", Prompt: "p", Stop: []string{"s"}})
	tests := map[string]struct {
		decode func([]byte) error
		input  []byte
	}{
		"submit empty":                 {func(p []byte) error { _, err := DecodeSubmit(p); return err }, nil},
		"submit truncated":             {func(p []byte) error { _, err := DecodeSubmit(p); return err }, valid[:len(valid)-1]},
		"submit trailing":              {func(p []byte) error { _, err := DecodeSubmit(p); return err }, append(append([]byte{}, valid...), 0)},
		"submit unknown flag":          {func(p []byte) error { _, err := DecodeSubmit(p); return err }, append([]byte{0x80}, valid[1:]...)},
		"submit huge string":           {func(p []byte) error { _, err := DecodeSubmit(p); return err }, []byte{0, 0xff, 0xff, 0xff, 0xff, 0x0f, 'a'}},
		"submit huge count":            {func(p []byte) error { _, err := DecodeSubmit(p); return err }, []byte{0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}},
		"token count over 32 bits":     {func(p []byte) error { _, err := DecodeToken(p); return err }, []byte{0x80, 0x80, 0x80, 0x80, 0x10, 0}},
		"token bad varint":             {func(p []byte) error { _, err := DecodeToken(p); return err }, bytes.Repeat([]byte{0xff}, 11)},
		"token without logprobs count": {func(p []byte) error { _, err := DecodeToken(p); return err }, []byte{1, 1, 'a'}},
		"token logprobs not one per token": {func(p []byte) error { _, err := DecodeToken(p); return err },
			AppendToken(nil, &infer.Token{Count: 2, Logprobs: []infer.TokenLogprob{sampleLogprobs("a", 0)}})},
		"token logprobs without tokens": {func(p []byte) error { _, err := DecodeToken(p); return err },
			AppendToken(nil, &infer.Token{Logprobs: []infer.TokenLogprob{sampleLogprobs("a", 0)}})},
		"token top_logprobs over max": {func(p []byte) error { _, err := DecodeToken(p); return err },
			AppendToken(nil, &infer.Token{Count: 1, Logprobs: []infer.TokenLogprob{sampleLogprobs("a", infer.MaxTopLogprobs+1)}})},
		"token logprobs truncated": {func(p []byte) error { _, err := DecodeToken(p); return err },
			truncated(AppendToken(nil, &infer.Token{Count: 1, Logprobs: []infer.TokenLogprob{sampleLogprobs("a", 2)}}))},
		"token logprobs huge count": {func(p []byte) error { _, err := DecodeToken(p); return err },
			[]byte{0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0, 0, 0, 0}},
		"submit top_logprobs over max": {func(p []byte) error { _, err := DecodeSubmit(p); return err },
			AppendSubmit(nil, &infer.Request{Model: "m", Prompt: "p", Logprobs: true, TopLogprobs: infer.MaxTopLogprobs + 1})},
		"submit top_logprobs without logprobs": {func(p []byte) error { _, err := DecodeSubmit(p); return err },
			AppendSubmit(nil, &infer.Request{Model: "m", Prompt: "p", TopLogprobs: 1})},
		"done truncated":           {func(p []byte) error { _, err := DecodeDone(p); return err }, []byte{4, 's', 't'}},
		"error trailing":           {func(p []byte) error { _, err := DecodeError(p); return err }, []byte{0, 0, 0}},
		"ready count too big":      {func(p []byte) error { _, err := DecodeReady(p); return err }, []byte{1, 1, 0, 5, 0, 0}},
		"stats truncated":          {func(p []byte) error { _, err := DecodeStats(p); return err }, []byte{1, 2, 3}},
		"frame short":              {decodeFrame, make([]byte, frameHeaderSize-1)},
		"frame type 0":             {decodeFrame, mutateFrame(func(b []byte) { b[4] = 0 })},
		"frame unknown type":       {decodeFrame, mutateFrame(func(b []byte) { b[4] = 99 })},
		"frame bad magic":          {decodeFrame, mutateFrame(func(b []byte) { b[5] = 0 })},
		"frame reserved":           {decodeFrame, mutateFrame(func(b []byte) { b[6] = 1 })},
		"frame reserved after crc": {decodeFrame, mutateFrame(func(b []byte) { b[23] = 1 })},
		"frame payload too long":   {decodeFrame, mutateFrame(func(b []byte) { b[0]++ })},
		"frame payload flipped":    {decodeFrame, mutateFrame(func(b []byte) { b[frameHeaderSize] ^= 1 })},
		"frame id flipped":         {decodeFrame, mutateFrame(func(b []byte) { b[8] ^= 1 })},
		"frame check flipped":      {decodeFrame, mutateFrame(func(b []byte) { b[16] ^= 1 })},
		"control frame flipped":    {decodeFrame, mutateControlFrame(func(b []byte) { b[len(b)-1] ^= 1 })},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			err := tt.decode(tt.input)
			if !errors.Is(err, ErrMalformed) {
				t.Errorf("got %v, want an error wrapping ErrMalformed", err)
			}
		})
	}
}

func decodeFrame(p []byte) error { _, _, err := DecodeFrame(p); return err }

func truncated(p []byte) []byte { return p[:len(p)-1] }

// mutateFrame returns a valid token frame changed by f.
func mutateFrame(f func([]byte)) []byte {
	b, err := AppendFrame(nil, Frame{Type: FrameToken, ID: 9, Payload: AppendToken(nil, &infer.Token{Count: 1, Text: "hi"})})
	if err != nil {
		panic(err)
	}
	f(b)
	return b
}

// mutateControlFrame returns a valid control frame changed by f: the
// check covers the model-version messages as it covers the token stream.
func mutateControlFrame(f func([]byte)) []byte {
	b, err := AppendFrame(nil, Frame{Type: FrameControl, ID: 3, Payload: AppendControl(nil, &Control{Op: ControlLoad, Name: "demo@2", Dir: "/d"})})
	if err != nil {
		panic(err)
	}
	if _, _, err := DecodeFrame(b); err != nil {
		panic(err)
	}
	f(b)
	return b
}

func TestRandomSubmitRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	str := func() string {
		b := make([]byte, rng.IntN(40))
		for i := range b {
			b[i] = byte(rng.IntN(256))
		}
		return string(b)
	}
	for i := range 2000 {
		want := infer.Request{
			Model: str(), Prompt: str(), MaxTokens: rng.Uint32(),
			Temperature: rng.Float32() * 2, TopP: rng.Float32(), Seed: rng.Uint64(), HasSeed: rng.IntN(2) == 0, IgnoreEOS: rng.IntN(2) == 0,
			Urgency: priority.Urgency(rng.IntN(priority.Levels)), Class: priority.Class(rng.IntN(3)), TraceParent: str(),
		}
		if rng.IntN(2) == 0 {
			want.Logprobs, want.TopLogprobs = true, uint8(rng.IntN(infer.MaxTopLogprobs+1))
		}
		for range rng.IntN(4) {
			want.Messages = append(want.Messages, infer.ChatMessage{Role: str(), Content: str()})
		}
		for range rng.IntN(4) {
			want.Stop = append(want.Stop, str())
		}
		got, err := DecodeSubmit(AppendSubmit(nil, &want))
		if err != nil {
			t.Fatalf("submit %d: %v", i, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("submit %d: got %+v, want %+v", i, got, want)
		}
	}
}

// The fuzz targets check that decoders never panic and that whatever they
// accept re-encodes to something that decodes to the same value. Values are
// compared through their encoding, so NaN floats compare equal to themselves.

func FuzzDecodeFrame(f *testing.F) {
	control := AppendControl(nil, &Control{Op: ControlUnload, Name: "demo@1"})
	logprobs := AppendToken(nil, &infer.Token{Count: 1, Text: "hi", Logprobs: []infer.TokenLogprob{sampleLogprobs("hi", 2)}})
	for _, fr := range []Frame{
		{Type: FrameToken, ID: 7, Payload: []byte("hi")}, {Type: FrameToken, ID: 8, Payload: logprobs},
		{Type: FrameCancel, ID: 1}, {Type: FrameControl, ID: 3, Payload: control},
	} {
		b, _ := AppendFrame(nil, fr)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		fr, n, err := DecodeFrame(p)
		if err != nil {
			return
		}
		if n > len(p) || len(fr.Payload) != n-frameHeaderSize {
			t.Fatalf("consumed %d of %d bytes with a %d-byte payload", n, len(p), len(fr.Payload))
		}
		b, err := AppendFrame(nil, fr)
		if err != nil || !bytes.Equal(b, p[:n]) {
			t.Fatalf("re-encoded %x, want %x (%v)", b, p[:n], err)
		}
	})
}

func FuzzDecodeSubmit(f *testing.F) {
	for _, s := range sampleSubmits() {
		if len(s.Prompt) < 1000 {
			f.Add(AppendSubmit(nil, &s))
		}
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		s, err := DecodeSubmit(p)
		if err != nil {
			return
		}
		b := AppendSubmit(nil, &s)
		s2, err := DecodeSubmit(b)
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if b2 := AppendSubmit(nil, &s2); !bytes.Equal(b, b2) {
			t.Fatalf("unstable encoding: %x then %x", b, b2)
		}
	})
}

func FuzzDecodeToken(f *testing.F) {
	f.Add(AppendToken(nil, &infer.Token{Count: 3, Text: "abc"}))
	f.Add(AppendToken(nil, &infer.Token{Count: 1, Text: "a", Logprobs: []infer.TokenLogprob{sampleLogprobs("a", 3)}}))
	f.Add(AppendToken(nil, &infer.Token{Count: 2, Logprobs: []infer.TokenLogprob{sampleLogprobs("\xe2", 0), sampleLogprobs("", 1)}}))
	f.Add(AppendToken(nil, &infer.Token{Count: 1, Text: "a", Index: 3, FinishReason: infer.FinishLength}))
	f.Add(AppendToken(nil, &infer.Token{Count: 2, Text: "x", ToolCalls: []infer.ToolCallDelta{{ID: "call_1", Name: "f"}, {Arguments: "{}"}}}))
	f.Add(AppendToken(nil, &infer.Token{Count: 1, Text: "y", Index: 1, FinishReason: infer.FinishToolCalls, ToolCalls: []infer.ToolCallDelta{{ID: "call_2", Name: "g", Arguments: "{}"}}}))
	f.Fuzz(func(t *testing.T, p []byte) {
		tok, err := DecodeToken(p)
		if err != nil {
			return
		}
		// Empty lists decode as nil, which reflect.DeepEqual tells from
		// an empty slice.
		if tok.Logprobs != nil && len(tok.Logprobs) == 0 {
			t.Fatalf("logprobs decoded as an empty slice, not nil")
		}
		for _, lp := range tok.Logprobs {
			if lp.Top != nil && len(lp.Top) == 0 {
				t.Fatalf("top_logprobs decoded as an empty slice, not nil")
			}
		}
		b := AppendToken(nil, &tok)
		got, err := DecodeToken(b)
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if b2 := AppendToken(nil, &got); !bytes.Equal(b, b2) {
			t.Fatalf("unstable encoding: %x then %x", b, b2)
		}
	})
}

func FuzzDecodeDone(f *testing.F) {
	f.Add(AppendDone(nil, &infer.Done{FinishReason: infer.FinishLength, PromptTokens: 3, CompletionTokens: 300}))
	f.Fuzz(func(t *testing.T, p []byte) {
		d, err := DecodeDone(p)
		if err != nil {
			return
		}
		if got, err := DecodeDone(AppendDone(nil, &d)); err != nil || got != d {
			t.Fatalf("got %+v, %v, want %+v", got, err, d)
		}
	})
}

func FuzzDecodeError(f *testing.F) {
	f.Add(AppendError(nil, &infer.Error{Code: infer.CodeModelNotFound, Message: "no model x"}))
	f.Fuzz(func(t *testing.T, p []byte) {
		e, err := DecodeError(p)
		if err != nil {
			return
		}
		if got, err := DecodeError(AppendError(nil, &e)); err != nil || got != e {
			t.Fatalf("got %+v, %v, want %+v", got, err, e)
		}
	})
}

func FuzzDecodeReady(f *testing.F) {
	f.Add(AppendReady(nil, &Ready{PID: 1, Slots: 2, Models: []infer.ModelInfo{{Name: "demo", ContextLength: 2048}}}))
	f.Fuzz(func(t *testing.T, p []byte) {
		r, err := DecodeReady(p)
		if err != nil {
			return
		}
		if got, err := DecodeReady(AppendReady(nil, &r)); err != nil || !reflect.DeepEqual(got, r) {
			t.Fatalf("got %+v, %v, want %+v", got, err, r)
		}
	})
}

func FuzzDecodeStats(f *testing.F) {
	f.Add(AppendStats(nil, &Stats{TokensGenerated: 1000, SequencesStarted: 10, SequencesFinished: 9, Active: 1}))
	f.Fuzz(func(t *testing.T, p []byte) {
		s, err := DecodeStats(p)
		if err != nil {
			return
		}
		if got, err := DecodeStats(AppendStats(nil, &s)); err != nil || got != s {
			t.Fatalf("got %+v, %v, want %+v", got, err, s)
		}
	})
}

func TestControlRoundTrip(t *testing.T) {
	for name, c := range map[string]Control{
		"load":   {Op: ControlLoad, Name: "demo@2", Dir: "/srv/models/demo/2"},
		"unload": {Op: ControlUnload, Name: "demo@1"},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := DecodeControl(AppendControl(nil, &c))
			if err != nil || got != c {
				t.Errorf("got %+v, %v; want %+v", got, err, c)
			}
		})
	}
	for name, p := range map[string][]byte{
		"empty":      nil,
		"unknown op": AppendControl(nil, &Control{Op: 7, Name: "x"}),
		"zero op":    AppendControl(nil, &Control{Name: "x"}),
		"trailing":   append(AppendControl(nil, &Control{Op: ControlUnload, Name: "x"}), 0),
		"truncated":  AppendControl(nil, &Control{Op: ControlLoad, Name: "demo", Dir: "/d"})[:5],
	} {
		if _, err := DecodeControl(p); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: got %v, want ErrMalformed", name, err)
		}
	}
}

func FuzzDecodeControl(f *testing.F) {
	f.Add(AppendControl(nil, &Control{Op: ControlLoad, Name: "demo@2", Dir: "/srv/models/demo/2"}))
	f.Add(AppendControl(nil, &Control{Op: ControlUnload, Name: "demo@1"}))
	f.Fuzz(func(t *testing.T, p []byte) {
		c, err := DecodeControl(p)
		if err != nil {
			return
		}
		b := AppendControl(nil, &c)
		c2, err := DecodeControl(b)
		if err != nil || c2 != c {
			t.Fatalf("re-decoded %+v, %v; want %+v", c2, err, c)
		}
	})
}
