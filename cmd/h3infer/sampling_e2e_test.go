package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"

	"h3infer/infer"
)

// TestEndToEndSamplingParameters sends the sampling parameters past
// temperature and top_p through the whole path (HTTP/3 and HTTP/2, the
// ring, the worker's batched sampler) and checks that the answer is the
// text the same request gets from the model in this process, streamed and
// not; that the parameters change the text (so none was dropped on the
// way); and that a logit_bias token the model does not have is a 400
// naming logit_bias.
func TestEndToEndSamplingParameters(t *testing.T) {
	s := startServer(t)
	params := map[string]any{
		"temperature": 0.9, "seed": 11, "top_k": 20, "min_p": 0.02,
		"presence_penalty": 0.6, "frequency_penalty": 0.9, "repetition_penalty": 1.3,
		"logit_bias": map[string]float64{"3": -100, "7": 4},
	}
	job := infer.Request{
		Model: "demo", Messages: []infer.ChatMessage{{Role: "user", Content: testPrompt}},
		MaxTokens: 32, Temperature: 0.9, Seed: 11, HasSeed: true, TopK: 20, MinP: 0.02,
		PresencePenalty: 0.6, FrequencyPenalty: 0.9, RepetitionPenalty: 1.3,
		LogitBias: []infer.LogitBias{{Token: 3, Bias: -100}, {Token: 7, Bias: 4}},
	}
	want, _ := inProcess(t, s, &job)
	plain := job
	plain.TopK, plain.MinP, plain.PresencePenalty, plain.FrequencyPenalty, plain.RepetitionPenalty, plain.LogitBias = 0, 0, 0, 0, 0, nil
	if without, _ := inProcess(t, s, &plain); without == want {
		t.Fatalf("the parameters changed nothing in process (%q): the test would not see them dropped", want)
	}

	for _, tc := range []struct {
		name   string
		client *http.Client
		stream bool
	}{
		{"h3 streamed", s.h3Client(t), true},
		{"h2 whole", s.h2Client(t), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := chatBody(32, tc.stream)
			for k, v := range params {
				body[k] = v
			}
			resp := postJSON(t, context.Background(), tc.client, s.base+"/v1/chat/completions", body)
			var got string
			if tc.stream {
				got = readStream(t, resp).text
			} else {
				defer resp.Body.Close()
				b, _ := io.ReadAll(resp.Body)
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("status %s: %s", resp.Status, b)
				}
				var out struct {
					Choices []struct {
						Message struct {
							Content string `json:"content"`
						} `json:"message"`
					} `json:"choices"`
				}
				if err := json.Unmarshal(b, &out); err != nil || len(out.Choices) != 1 {
					t.Fatalf("response %s: %v", b, err)
				}
				got = out.Choices[0].Message.Content
			}
			if got != want {
				t.Errorf("text over the gateway differs from the model in process:\n got %q\nwant %q", got, want)
			}
		})
	}

	// A text completion's logprobs, in the legacy shape: whole and
	// streamed agree, one entry per token, offsets adding up.
	type textLogprobs struct {
		Tokens        []string             `json:"tokens"`
		TokenLogprobs []float64            `json:"token_logprobs"`
		TopLogprobs   []map[string]float64 `json:"top_logprobs"`
		TextOffset    []int                `json:"text_offset"`
	}
	textBody := map[string]any{"model": "demo", "prompt": testPrompt, "max_tokens": 16, "temperature": 0, "logprobs": 3, "ignore_eos": true}
	resp := postJSON(t, context.Background(), s.h3Client(t), s.base+"/v1/completions", textBody)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var whole struct {
		Choices []struct {
			Text     string       `json:"text"`
			Logprobs textLogprobs `json:"logprobs"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(b, &whole); err != nil || len(whole.Choices) != 1 {
		t.Fatalf("text completion with logprobs: %s (%v)", b, err)
	}
	wl := whole.Choices[0].Logprobs
	if len(wl.Tokens) != 16 || len(wl.TokenLogprobs) != 16 || len(wl.TopLogprobs) != 16 || len(wl.TextOffset) != 16 {
		t.Fatalf("logprobs %+v: want 16 of each list", wl)
	}
	for i, tok := range wl.Tokens {
		if len(wl.TopLogprobs[i]) == 0 || len(wl.TopLogprobs[i]) > 3 || wl.TopLogprobs[i][tok] != wl.TokenLogprobs[i] {
			t.Errorf("token %d %q: alternatives %v should hold the greedy choice at %v", i, tok, wl.TopLogprobs[i], wl.TokenLogprobs[i])
		}
		if i > 0 && wl.TextOffset[i] != wl.TextOffset[i-1]+len(wl.Tokens[i-1]) {
			t.Errorf("text_offset %v does not add up over tokens %q", wl.TextOffset, wl.Tokens)
		}
	}
	textBody["stream"] = true
	resp = postJSON(t, context.Background(), s.h3Client(t), s.base+"/v1/completions", textBody)
	var streamed []float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || data == "[DONE]" {
			continue
		}
		var ev struct {
			Choices []struct {
				Logprobs *textLogprobs `json:"logprobs"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(data), &ev); err != nil {
			t.Fatalf("event %s: %v", data, err)
		}
		for _, c := range ev.Choices {
			if c.Logprobs != nil {
				streamed = append(streamed, c.Logprobs.TokenLogprobs...)
			}
		}
	}
	resp.Body.Close()
	if !slices.Equal(streamed, wl.TokenLogprobs) {
		t.Errorf("streamed token_logprobs %v, whole %v", streamed, wl.TokenLogprobs)
	}

	body := chatBody(8, false)
	body["logit_bias"] = map[string]float64{"4000000000": 1}
	resp = postJSON(t, context.Background(), s.h3Client(t), s.base+"/v1/chat/completions", body)
	defer resp.Body.Close()
	var e struct {
		Error struct {
			Message string  `json:"message"`
			Param   *string `json:"param"`
		} `json:"error"`
	}
	b, _ = io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("error body %s: %v", b, err)
	}
	if resp.StatusCode != http.StatusBadRequest || e.Error.Param == nil || *e.Error.Param != "logit_bias" || !strings.Contains(e.Error.Message, "4000000000") {
		t.Errorf("a token the model lacks: got %s %s; want 400 naming logit_bias and the token", resp.Status, b)
	}
}
