package transport

import (
	"bytes"
	"errors"
	"reflect"
	"testing"

	"h3infer/infer"
)

// A token of a request with several choices carries its index and, on
// the choice's last, its finish reason; one of a request with one choice
// encodes as it did before choices existed.
func TestChoiceTokenRoundTrip(t *testing.T) {
	for _, want := range []infer.Token{
		{Count: 1, Text: "a", Index: 1},
		{Count: 1, Text: "", Index: infer.MaxChoices - 1, FinishReason: infer.FinishStop},
		{Count: 1, Text: "b", FinishReason: infer.FinishLength}, // choice 0's last
		{Count: 2, Text: "cd", Index: 2, Logprobs: []infer.TokenLogprob{sampleLogprobs("c", 1), sampleLogprobs("d", 0)}},
	} {
		got, err := DecodeToken(AppendToken(nil, &want))
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("got %+v, %v, want %+v", got, err, want)
		}
	}
	one := infer.Token{Count: 1, Text: "hello"}
	if b := AppendToken(nil, &one); len(b) != 8 {
		t.Errorf("a token of one choice takes %d bytes, want 8 as before", len(b))
	}
	two := infer.Request{Model: "m", Prompt: "p", N: 2}
	single := two
	single.N = 1
	if a, b := AppendSubmit(nil, &single), AppendSubmit(nil, &infer.Request{Model: "m", Prompt: "p"}); !bytes.Equal(a, b) {
		t.Errorf("n 1 encodes as %x, a request without n as %x", a, b)
	}
	if got, err := DecodeSubmit(AppendSubmit(nil, &two)); err != nil || got.N != 2 {
		t.Errorf("n 2: got %d, %v", got.N, err)
	}
	st := Stats{SequencesStarted: 4, Prefills: 3, PrefillTokens: 1 << 40}
	if got, err := DecodeStats(AppendStats(nil, &st)); err != nil || got != st {
		t.Errorf("stats: got %+v, %v, want %+v", got, err, st)
	}
	// A report from a worker that counts no prefills still decodes.
	old := []byte{1, 2, 3, 4, 5}
	if got, err := DecodeStats(old); err != nil || got.Active != 5 || got.Prefills != 0 {
		t.Errorf("stats without prefills: got %+v, %v", got, err)
	}
}

// A worker cannot make the gateway index past the choices any request
// may have, nor a gateway ask a worker for out of range choices.
func TestChoicesRejects(t *testing.T) {
	submitN := func(n byte) []byte {
		b := AppendSubmit(nil, &infer.Request{Model: "m", Prompt: "p", N: 2})
		b[0] |= submitChoices
		b[len(b)-1] = n
		return b
	}
	tests := map[string]struct {
		decode func([]byte) error
		input  []byte
	}{
		"submit n 0":      {func(p []byte) error { _, err := DecodeSubmit(p); return err }, submitN(0)},
		"submit n 1":      {func(p []byte) error { _, err := DecodeSubmit(p); return err }, submitN(1)},
		"submit n 17":     {func(p []byte) error { _, err := DecodeSubmit(p); return err }, submitN(infer.MaxChoices + 1)},
		"submit n absent": {func(p []byte) error { _, err := DecodeSubmit(p); return err }, submitN(2)[:len(submitN(2))-1]},
		"token index 16": {func(p []byte) error { _, err := DecodeToken(p); return err },
			AppendToken(nil, &infer.Token{Count: 1, Index: infer.MaxChoices})},
		"token index truncated": {func(p []byte) error { _, err := DecodeToken(p); return err },
			truncated(AppendToken(nil, &infer.Token{Count: 1, Index: 1, FinishReason: "stop"}))},
		"stats prefill tokens missing": {func(p []byte) error { _, err := DecodeStats(p); return err }, []byte{1, 2, 3, 4, 5, 6}},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			if err := tt.decode(tt.input); !errors.Is(err, ErrMalformed) {
				t.Errorf("got %v, want an error wrapping ErrMalformed", err)
			}
		})
	}
}
