package gateway

import (
	"bytes"
	"crypto/rand"
	"encoding/json"

	"h3infer/infer"
)

// The OpenAI response shapes, for both routes and both modes.

type usage struct {
	PromptTokens     uint32 `json:"prompt_tokens"`
	CompletionTokens uint32 `json:"completion_tokens"`
	TotalTokens      uint32 `json:"total_tokens"`
}

func usageOf(d *infer.Done) usage {
	return usage{
		PromptTokens:     d.PromptTokens,
		CompletionTokens: d.CompletionTokens,
		TotalTokens:      d.PromptTokens + d.CompletionTokens,
	}
}

// envelope is the part every response object shares.
type envelope struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
}

type chatDelta struct {
	Role      string          `json:"role,omitempty"`
	Content   *string         `json:"content,omitempty"`
	ToolCalls []toolCallChunk `json:"tool_calls,omitempty"`
}

type chatChunkChoice struct {
	Index        int           `json:"index"`
	Delta        chatDelta     `json:"delta"`
	Logprobs     *chatLogprobs `json:"logprobs"`
	FinishReason *string       `json:"finish_reason"`
}

type chatMessageOut struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type chatChoice struct {
	Index        int            `json:"index"`
	Message      chatMessageOut `json:"message"`
	Logprobs     *chatLogprobs  `json:"logprobs"`
	FinishReason string         `json:"finish_reason"`
}

type textChoice struct {
	Text         string        `json:"text"`
	Index        int           `json:"index"`
	Logprobs     *textLogprobs `json:"logprobs"`
	FinishReason *string       `json:"finish_reason"`
}

// chatLogprobs is a chat choice's logprobs: one entry per token, in
// OpenAI's shape, the token's bytes beside its text (a token may be part
// of a UTF-8 character, which the text cannot show).
type chatLogprobs struct {
	Content []chatTokenLogprob `json:"content"`
	Refusal []chatTokenLogprob `json:"refusal"` // always null: h3infer has no refusals
}

type chatTokenLogprob struct {
	Token       string           `json:"token"`
	Logprob     float32          `json:"logprob"`
	Bytes       []int            `json:"bytes"`
	TopLogprobs []chatTopLogprob `json:"top_logprobs"`
}

type chatTopLogprob struct {
	Token   string  `json:"token"`
	Logprob float32 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

// textLogprobs is a text completion's logprobs, in the legacy shape:
// parallel lists, each alternative set an object from token to logprob,
// and each token's offset in bytes into the completion's text.
type textLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []float32            `json:"token_logprobs"`
	TopLogprobs   []map[string]float32 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
}

// logprobs renders lps for the encoder's kind; nil when there are none.
// offset is the byte offset of the first entry's token in the completion,
// for text completions; it returns the offset after the last.
func (e *encoder) logprobs(lps []infer.TokenLogprob, offset int) (chat *chatLogprobs, text *textLogprobs, next int) {
	if lps == nil {
		return nil, nil, offset
	}
	if e.kind == kindChat {
		chat = &chatLogprobs{Content: make([]chatTokenLogprob, len(lps))}
		for i, lp := range lps {
			top := make([]chatTopLogprob, len(lp.Top))
			for j, t := range lp.Top {
				top[j] = chatTopLogprob{Token: t.Token, Logprob: t.Logprob, Bytes: byteList(t.Token)}
			}
			chat.Content[i] = chatTokenLogprob{Token: lp.Token, Logprob: lp.Logprob, Bytes: byteList(lp.Token), TopLogprobs: top}
		}
		return chat, nil, offset
	}
	text = &textLogprobs{
		Tokens:        make([]string, len(lps)),
		TokenLogprobs: make([]float32, len(lps)),
		TextOffset:    make([]int, len(lps)),
	}
	for i, lp := range lps {
		text.Tokens[i], text.TokenLogprobs[i], text.TextOffset[i] = lp.Token, lp.Logprob, offset
		offset += len(lp.Token)
		if lp.Top != nil {
			if text.TopLogprobs == nil {
				text.TopLogprobs = make([]map[string]float32, len(lps))
			}
			text.TopLogprobs[i] = make(map[string]float32, len(lp.Top))
			for _, t := range lp.Top {
				text.TopLogprobs[i][t.Token] = t.Logprob
			}
		}
	}
	return nil, text, offset
}

// byteList is s's bytes as JSON numbers, as OpenAI gives a token's bytes.
func byteList(s string) []int {
	b := make([]int, len(s))
	for i := range len(s) {
		b[i] = int(s[i])
	}
	return b
}

// chunk is one streamed event; Choices is a slice of chatChunkChoice or
// textChoice.
type chunk struct {
	envelope
	Choices any    `json:"choices"`
	Usage   *usage `json:"usage,omitempty"`
}

type fullResponse struct {
	envelope
	Choices any   `json:"choices"`
	Usage   usage `json:"usage"`
}

// encoder renders one request's response objects.
type encoder struct {
	kind apiKind
	env  envelope // Object holds the streamed chunk's object name
	// A token's event is the same bytes each time but for its text:
	// tokenHead, the text as a JSON string, tokenTail. Rendering them once
	// spares a reflective json.Marshal per token, which was the gateway's
	// largest single cost when streaming.
	tokenHead, tokenTail []byte
}

// textMark stands for a token's text while the token event's fixed parts
// are rendered.
const textMark = "\x00"

func newEncoder(kind apiKind, model string, created int64) *encoder {
	e := &encoder{kind: kind, env: envelope{ID: "cmpl-" + rand.Text(), Object: "text_completion", Created: created, Model: model}}
	if kind == kindChat {
		e.env.ID = "chatcmpl-" + rand.Text()
		e.env.Object = "chat.completion.chunk"
	}
	whole := e.tokenSlow(textMark)
	mark, _ := json.Marshal(textMark)
	// The text is the last string of the event: the envelope's fields come
	// first.
	i := bytes.LastIndex(whole, mark)
	e.tokenHead, e.tokenTail = whole[:i], whole[i+len(mark):]
	return e
}

// opening is the chunk that precedes the tokens: chat streams announce the
// assistant role; text completions have nothing to announce.
func (e *encoder) opening() []byte {
	if e.kind != kindChat {
		return nil
	}
	empty := ""
	return e.chunk([]chatChunkChoice{{Delta: chatDelta{Role: "assistant", Content: &empty}}}, nil)
}

// token renders one token's event: the fixed parts around the text, the
// text itself escaped as encoding/json would (jsonString).
func (e *encoder) token(text string) []byte {
	out := make([]byte, 0, len(e.tokenHead)+len(text)+len(e.tokenTail)+8)
	out = append(out, e.tokenHead...)
	out = appendJSONString(out, text)
	return append(out, e.tokenTail...)
}

// appendJSONString appends s as encoding/json writes a string. Tokens are
// almost always plain printable ASCII, which needs no escaping; anything
// else goes through encoding/json itself, so the two never differ.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

// tokenSlow renders a token's event the reflective way; newEncoder cuts
// it into the fixed parts token uses.
func (e *encoder) tokenSlow(text string) []byte {
	if e.kind == kindChat {
		return e.chunk([]chatChunkChoice{{Delta: chatDelta{Content: &text}}}, nil)
	}
	return e.chunk([]textChoice{{Text: text}}, nil)
}

// tokenWithLogprobs renders a token's event that carries its logprobs
// (the reflective way: the fast token path has no room for them).
// offset is as for logprobs.
func (e *encoder) tokenWithLogprobs(text string, lps []infer.TokenLogprob, offset int) ([]byte, int) {
	chat, tl, next := e.logprobs(lps, offset)
	if e.kind == kindChat {
		return e.chunk([]chatChunkChoice{{Delta: chatDelta{Content: &text}, Logprobs: chat}}, nil), next
	}
	return e.chunk([]textChoice{{Text: text, Logprobs: tl}}, nil), next
}

// finish renders the event that ends the choice, with the logprobs of
// tokens whose text never went out (held back, then ended), if any.
func (e *encoder) finish(reason string, lps []infer.TokenLogprob, offset int) []byte {
	chat, tl, _ := e.logprobs(lps, offset)
	if e.kind == kindChat {
		return e.chunk([]chatChunkChoice{{FinishReason: &reason, Logprobs: chat}}, nil)
	}
	return e.chunk([]textChoice{{FinishReason: &reason, Logprobs: tl}}, nil)
}

func (e *encoder) usage(u usage) []byte {
	return e.chunk([]struct{}{}, &u)
}

func (e *encoder) chunk(choices any, u *usage) []byte {
	b, _ := json.Marshal(chunk{envelope: e.env, Choices: choices, Usage: u})
	return sseData(b)
}

// complete renders the whole non-streamed answer; lps is nil unless the
// request asked for logprobs.
func (e *encoder) complete(text, reason string, u usage, lps []infer.TokenLogprob) []byte {
	r := fullResponse{envelope: e.env, Usage: u}
	chat, tl, _ := e.logprobs(lps, 0)
	if e.kind == kindChat {
		r.Object = "chat.completion"
		r.Choices = []chatChoice{{Message: chatMessageOut{Role: "assistant", Content: text}, Logprobs: chat, FinishReason: reason}}
	} else {
		r.Choices = []textChoice{{Text: text, Logprobs: tl, FinishReason: &reason}}
	}
	b, _ := json.Marshal(r)
	return append(b, '\n')
}

var sseDone = []byte("data: [DONE]\n\n")

// sseData frames one server-sent event.
func sseData(payload []byte) []byte {
	out := make([]byte, 0, len(payload)+8)
	out = append(out, "data: "...)
	out = append(out, payload...)
	return append(out, "\n\n"...)
}
