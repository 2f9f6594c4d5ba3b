package upstream

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"

	"h3infer/infer"
)

// shape is what the gateway asked of an upstream's stream: which route's
// chunks to read, and whether each token carries its logprobs.
type shape struct {
	chat     bool
	logprobs bool
	top      int         // alternatives per token the client asked for
	choices  uint32      // how many: indexes 0 to choices-1
	calls    *callReader // the request's tools; nil: it offered none
}

// maxChunkLogprobs bounds the tokens one chunk's logprobs may describe.
// A server sends one token per chunk, or a few when it coalesces (h3infer
// does); the line bound (maxLine) already caps the bytes, and this keeps
// a hostile upstream from turning one line into a million tiny entries.
const maxChunkLogprobs = 4096

var errNoLogprobs = errors.New("a token arrived without the logprobs the request asked for")

// chunkLogprobs reads one choice's logprobs in the shape of its route,
// as OpenAI writes them (and vLLM, SGLang and h3infer follow):
//
//   - chat: {"content": [{"token", "logprob", "bytes", "top_logprobs":
//     [{"token", "logprob", "bytes"}]}]};
//   - text completions: {"tokens": [...], "token_logprobs": [...],
//     "top_logprobs": [{token: logprob}, ...]}, parallel lists.
//
// A token's text comes from its bytes where the server gives them, since
// a token may be part of a UTF-8 character that JSON's string could not
// hold. Alternatives beyond those asked for are dropped, and a text
// completion's (an unordered object) are put most likely first. raw null
// or absent is no logprobs (nil, nil).
func chunkLogprobs(raw json.RawMessage, sh shape) ([]infer.TokenLogprob, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	if sh.chat {
		return chatChunkLogprobs(raw, sh.top)
	}
	return textChunkLogprobs(raw, sh.top)
}

type wireTop struct {
	Token   string   `json:"token"`
	Logprob *float64 `json:"logprob"`
	Bytes   []int    `json:"bytes"`
}

type wireChatLogprob struct {
	wireTop
	TopLogprobs []wireTop `json:"top_logprobs"`
}

func chatChunkLogprobs(raw json.RawMessage, top int) ([]infer.TokenLogprob, error) {
	var lp struct {
		Content []wireChatLogprob `json:"content"`
	}
	if err := json.Unmarshal(raw, &lp); err != nil {
		return nil, fmt.Errorf("logprobs: %w", err)
	}
	if len(lp.Content) > maxChunkLogprobs {
		return nil, fmt.Errorf("logprobs: %d tokens in one chunk", len(lp.Content))
	}
	out := make([]infer.TokenLogprob, len(lp.Content))
	for i, c := range lp.Content {
		tok, p, err := c.read()
		if err != nil {
			return nil, fmt.Errorf("logprobs.content[%d]: %w", i, err)
		}
		out[i] = infer.TokenLogprob{Token: tok, Logprob: p}
		if top == 0 {
			continue
		}
		out[i].Top = make([]infer.TopLogprob, 0, min(top, len(c.TopLogprobs)))
		for j, t := range c.TopLogprobs[:min(top, len(c.TopLogprobs))] {
			tok, p, err := t.read()
			if err != nil {
				return nil, fmt.Errorf("logprobs.content[%d].top_logprobs[%d]: %w", i, j, err)
			}
			out[i].Top = append(out[i].Top, infer.TopLogprob{Token: tok, Logprob: p})
		}
	}
	return out, nil
}

// read is the entry's token, from its bytes when they are there, and its
// log probability.
func (w wireTop) read() (string, float32, error) {
	p, err := logprob(w.Logprob)
	if err != nil {
		return "", 0, err
	}
	if w.Bytes == nil {
		return w.Token, p, nil
	}
	b := make([]byte, len(w.Bytes))
	for i, v := range w.Bytes {
		if v < 0 || v > 255 {
			return "", 0, fmt.Errorf("bytes[%d]: %d is not a byte", i, v)
		}
		b[i] = byte(v)
	}
	return string(b), p, nil
}

// logprob checks a log probability: present, and at most 0. OpenAI writes
// -9999.0 for one too small to say; -Inf cannot be written in JSON.
func logprob(p *float64) (float32, error) {
	switch {
	case p == nil:
		return 0, errors.New("logprob missing")
	case math.IsNaN(*p) || *p > 0:
		return 0, fmt.Errorf("logprob %v is not a log probability", *p)
	}
	return float32(*p), nil
}

func textChunkLogprobs(raw json.RawMessage, top int) ([]infer.TokenLogprob, error) {
	var lp struct {
		Tokens        []string              `json:"tokens"`
		TokenLogprobs []*float64            `json:"token_logprobs"`
		TopLogprobs   []map[string]*float64 `json:"top_logprobs"`
	}
	if err := json.Unmarshal(raw, &lp); err != nil {
		return nil, fmt.Errorf("logprobs: %w", err)
	}
	n := len(lp.Tokens)
	switch {
	case n > maxChunkLogprobs:
		return nil, fmt.Errorf("logprobs: %d tokens in one chunk", n)
	case len(lp.TokenLogprobs) != n:
		return nil, fmt.Errorf("logprobs: %d tokens but %d token_logprobs", n, len(lp.TokenLogprobs))
	case top > 0 && len(lp.TopLogprobs) != n:
		return nil, fmt.Errorf("logprobs: %d tokens but %d top_logprobs", n, len(lp.TopLogprobs))
	}
	out := make([]infer.TokenLogprob, n)
	for i, tok := range lp.Tokens {
		p, err := logprob(lp.TokenLogprobs[i])
		if err != nil {
			return nil, fmt.Errorf("logprobs.token_logprobs[%d]: %w", i, err)
		}
		out[i] = infer.TokenLogprob{Token: tok, Logprob: p}
		if top == 0 {
			continue
		}
		alts := make([]infer.TopLogprob, 0, len(lp.TopLogprobs[i]))
		for t, p := range lp.TopLogprobs[i] {
			v, err := logprob(p)
			if err != nil {
				return nil, fmt.Errorf("logprobs.top_logprobs[%d][%q]: %w", i, t, err)
			}
			alts = append(alts, infer.TopLogprob{Token: t, Logprob: v})
		}
		// Most likely first; ties by token, so the order is the same
		// every time whatever the map's.
		slices.SortFunc(alts, func(a, b infer.TopLogprob) int {
			if a.Logprob != b.Logprob {
				if a.Logprob > b.Logprob {
					return -1
				}
				return 1
			}
			return strings.Compare(a.Token, b.Token)
		})
		out[i].Top = alts[:min(top, len(alts))]
	}
	return out, nil
}
