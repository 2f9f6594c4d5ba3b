package gateway

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"testing"

	"h3infer/infer"
	"h3infer/scheduler"
)

// choiceTokens are the events of a request for 2 choices as a worker
// interleaves them: choice 1 ends first, choice 0 goes on, then the Done
// for both.
func choiceTokens() []infer.Event {
	tok := func(i uint32, text, finish string) infer.Event {
		return infer.Event{Token: infer.Token{Count: 1, Text: text, Index: i, FinishReason: finish}}
	}
	return []infer.Event{
		tok(0, "Hel", ""), tok(1, "Yo", ""), tok(0, "", ""), tok(1, "!", infer.FinishStop),
		tok(0, "lo", ""), tok(0, " you", infer.FinishLength),
		{Done: &infer.Done{FinishReason: infer.FinishLength, PromptTokens: 5, CompletionTokens: 6}},
	}
}

// The gateway asks the scheduler for n choices and answers with one
// choice per index, in order, each with its own finish_reason, and usage
// over all of them, streamed (a choice that ends sends its finish chunk
// while the others go on) and not.
func TestChoicesResponse(t *testing.T) {
	h := newHarness(t, nil)
	h.sched.setScript(func(r *scheduler.Request) ([]infer.Event, error) {
		if r.Job.N != 2 {
			return nil, fmt.Errorf("job asks for %d choices, want 2", r.Job.N)
		}
		return choiceTokens(), nil
	})
	for _, path := range []string{"/v1/chat/completions", "/v1/completions"} {
		body := `{"model":"demo","n":2,`
		if path == "/v1/chat/completions" {
			body += `"messages":[{"role":"user","content":"hi"}]`
		} else {
			body += `"prompt":"hi"`
		}
		t.Run(path, func(t *testing.T) {
			resp := h.post(t, "h3", path, body+`}`)
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d: %s", resp.StatusCode, b)
			}
			var whole struct {
				Choices []struct {
					Index   int `json:"index"`
					Text    string
					Message struct{ Content string }
					Finish  string `json:"finish_reason"`
				}
				Usage usage
			}
			if err := json.Unmarshal(b, &whole); err != nil {
				t.Fatal(err)
			}
			want := []struct{ text, finish string }{{"Hello you", "length"}, {"Yo!", "stop"}}
			if len(whole.Choices) != 2 {
				t.Fatalf("%d choices: %s", len(whole.Choices), b)
			}
			for i, c := range whole.Choices {
				if c.Index != i || c.Text+c.Message.Content != want[i].text || c.Finish != want[i].finish {
					t.Errorf("choice %d: %+v, want %+v", i, c, want[i])
				}
			}
			if whole.Usage != (usage{5, 6, 11}) {
				t.Errorf("usage %+v, want 5 + 6", whole.Usage)
			}

			resp = h.post(t, "h3", path, body+`,"stream":true,"stream_options":{"include_usage":true}}`)
			events := sseEvents(t, resp.Body)
			if events[len(events)-1] != "[DONE]" {
				t.Fatalf("stream does not end with [DONE]: %q", events)
			}
			text := make([]string, 2)
			var finishes []string // "index:reason", in order
			var u *usage
			for _, e := range events[:len(events)-1] {
				var c streamChunk
				if err := json.Unmarshal([]byte(e), &c); err != nil {
					t.Fatal(err)
				}
				if c.Usage != nil {
					u = c.Usage
				}
				for _, ch := range c.Choices {
					if ch.Delta.Content != nil {
						text[ch.Index] += *ch.Delta.Content
					}
					text[ch.Index] += ch.Text
					if ch.FinishReason != nil {
						finishes = append(finishes, fmt.Sprintf("%d:%s", ch.Index, *ch.FinishReason))
					}
				}
			}
			if text[0] != want[0].text || text[1] != want[1].text {
				t.Errorf("streamed texts %q, want %q and %q", text, want[0].text, want[1].text)
			}
			if fmt.Sprint(finishes) != "[1:stop 0:length]" {
				t.Errorf("finish chunks %v, want choice 1's first", finishes)
			}
			if u == nil || *u != (usage{5, 6, 11}) {
				t.Errorf("usage chunk %+v, want 5 + 6", u)
			}
		})
	}
}

// A backend that sends a token of a choice the request did not ask for
// fails the request rather than writing it somewhere.
func TestChoicesOutOfRange(t *testing.T) {
	h := newHarness(t, nil)
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) {
		return []infer.Event{{Token: infer.Token{Count: 1, Text: "x", Index: 2}}, done("stop", 1, 1)}, nil
	})
	resp := h.post(t, "h3", "/v1/completions", `{"model":"demo","prompt":"hi","n":2}`)
	if resp.StatusCode != http.StatusInternalServerError {
		t.Errorf("status %d, want 500", resp.StatusCode)
	}
	resp = h.post(t, "h3", "/v1/completions", `{"model":"demo","prompt":"hi","n":2,"stream":true}`)
	events := sseEvents(t, resp.Body)
	if len(events) == 0 || events[len(events)-1] == "[DONE]" {
		t.Errorf("stream %q, want it to end with an error event", events)
	}
}

// The scheduler's refusal of more choices than a worker may run, and a
// worker's, are 400s naming n.
func TestChoicesRefusedName(t *testing.T) {
	for name, err := range map[string]error{
		"scheduler": fmt.Errorf("wrapped: %w", &scheduler.ChoicesError{Choices: 8, Most: 3}),
		"worker":    &workerFailure{err: infer.Error{Code: infer.CodeInvalidRequest, Message: "n: 8 choices need 8 slots of one worker"}},
	} {
		e := apiErrorOf(err)
		if e.status != http.StatusBadRequest || e.body.Param == nil || *e.body.Param != "n" {
			t.Errorf("%s: status %d, param %v; want 400 naming n", name, e.status, e.body.Param)
		}
	}
}

// A tokens_per_minute limit reserves max_tokens once per choice: n
// choices whose reservation exceeds the tenant's burst are a 400 naming
// n, and ones that fit but not in what is left wait like any request.
func TestChoicesReserveTokensPerChoice(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.RateLimits.Default = TenantLimit{TokensPerMinute: 6, TokenBurst: 100}
	})
	h.sched.setScript(func(*scheduler.Request) ([]infer.Event, error) { return choiceTokens(), nil })
	body := func(n, maxTokens int) string {
		return fmt.Sprintf(`{"model":"demo","prompt":"hi","n":%d,"max_tokens":%d}`, n, maxTokens)
	}
	resp := h.post(t, "h3", "/v1/completions", body(3, 40))
	b, _ := io.ReadAll(resp.Body)
	var e struct{ Error errorObject }
	if json.Unmarshal(b, &e); resp.StatusCode != http.StatusBadRequest || e.Error.Param == nil || *e.Error.Param != "n" {
		t.Errorf("3 choices of 40 tokens over a burst of 100: status %d, %s; want a 400 naming n", resp.StatusCode, b)
	}
	// 2 of 40 fit; they use 6, so 94 are left: 2 of 48 do not fit.
	if resp := h.post(t, "h3", "/v1/completions", body(2, 40)); resp.StatusCode != http.StatusOK {
		t.Fatalf("2 choices of 40: status %d", resp.StatusCode)
	}
	checkRefusal(t, h.post(t, "h3", "/v1/completions", body(2, 48)), `"tokens_per_minute";q=100;w=1000`)
}
