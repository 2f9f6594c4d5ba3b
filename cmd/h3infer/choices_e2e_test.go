package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"

	"h3infer/infer"
)

// choiceWant is what choice i of a seeded request must be: the text the
// same request with one choice and the seed infer.ChoiceSeed(seed, i)
// makes in process.
type choiceWant struct {
	text, finish string
	tokens       int
}

func wantChoices(t *testing.T, s *server, base infer.Request, n int) ([]choiceWant, infer.Done) {
	t.Helper()
	want := make([]choiceWant, n)
	var total infer.Done
	distinct := map[string]bool{}
	for i := range want {
		alone := base
		alone.Seed, alone.HasSeed = infer.ChoiceSeed(base.Seed, i), true
		text, done := inProcess(t, s, &alone)
		want[i] = choiceWant{text, done.FinishReason, int(done.CompletionTokens)}
		total.PromptTokens = done.PromptTokens
		total.CompletionTokens += done.CompletionTokens
		distinct[text] = true
	}
	if len(distinct) < 2 {
		t.Fatalf("every seeded choice makes the same text in process; the comparison would prove nothing")
	}
	return want, total
}

// TestSDKChoices asks for n choices through OpenAI's own SDKs, unmodified:
// Go over HTTP/3, npm over TCP. Every choice comes back under its index,
// whole and streamed alike, each the text its derived seed makes alone,
// with its own finish reason and logprobs; usage counts the prompt once
// and every choice's tokens; the worker prefilled the prompt once; and n
// out of range is the SDK's typed 400 naming n.
func TestSDKChoices(t *testing.T) {
	s := startServer(t)
	const n, maxTokens, seed = 4, 24, 7
	chatJob := infer.Request{Model: "demo", Messages: []infer.ChatMessage{{Role: "user", Content: testPrompt}}, MaxTokens: maxTokens, Temperature: 1, Seed: seed}
	wantChat, chatUsage := wantChoices(t, s, chatJob, n)
	textJob := infer.Request{Model: "demo", Prompt: testPrompt, MaxTokens: maxTokens, Temperature: 1, Seed: seed}
	wantText, textUsage := wantChoices(t, s, textJob, n)

	check := func(what string, i int, index int64, text, finish string, logprobs int, want []choiceWant) {
		t.Helper()
		if index != int64(i) || text != want[i].text || finish != want[i].finish || logprobs != want[i].tokens {
			t.Errorf("%s choice %d: index %d, %q (%s, %d logprobs); want %q (%s, %d tokens)",
				what, i, index, text, finish, logprobs, want[i].text, want[i].finish, want[i].tokens)
		}
	}
	checkUsage := func(what string, prompt, completion int64, want infer.Done) {
		t.Helper()
		if prompt != int64(want.PromptTokens) || completion != int64(want.CompletionTokens) {
			t.Errorf("%s usage: %d prompt, %d completion tokens; want %d once and %d over the choices",
				what, prompt, completion, want.PromptTokens, want.CompletionTokens)
		}
	}

	t.Run("go over HTTP/3", func(t *testing.T) {
		ctx := context.Background()
		client := goSDK(t, s)
		params := openai.ChatCompletionNewParams{
			Model:       "demo",
			Messages:    []openai.ChatCompletionMessageParamUnion{openai.UserMessage(testPrompt)},
			MaxTokens:   openai.Int(maxTokens),
			Temperature: openai.Float(1),
			Seed:        openai.Int(seed),
			N:           openai.Int(n),
			Logprobs:    openai.Bool(true),
		}
		prefills := metric(t, s, "h3infer_worker_prefills_total")
		prefillTokens := metric(t, s, "h3infer_worker_prefill_tokens_total")
		finished := metric(t, s, "h3infer_worker_sequences_finished_total")
		full, err := client.Chat.Completions.New(ctx, params)
		if err != nil {
			t.Fatalf("Chat.Completions.New: %v", err)
		}
		if len(full.Choices) != n {
			t.Fatalf("%d choices, want %d", len(full.Choices), n)
		}
		for i, c := range full.Choices {
			check("whole chat", i, c.Index, c.Message.Content, c.FinishReason, len(c.Logprobs.Content), wantChat)
		}
		checkUsage("whole chat", full.Usage.PromptTokens, full.Usage.CompletionTokens, chatUsage)
		// The worker reports its counters once it is idle again.
		pollUntil(t, "the worker to report the request", 10*time.Second, func() bool {
			return metric(t, s, "h3infer_worker_sequences_finished_total") > finished
		})
		if d, dt := metric(t, s, "h3infer_worker_prefills_total")-prefills, metric(t, s, "h3infer_worker_prefill_tokens_total")-prefillTokens; d != 1 || dt != float64(chatUsage.PromptTokens) {
			t.Errorf("%d choices took %v prefills of %v tokens; want one of %d", n, d, dt, chatUsage.PromptTokens)
		}

		params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
		stream := client.Chat.Completions.NewStreaming(ctx, params)
		var acc openai.ChatCompletionAccumulator
		for stream.Next() {
			acc.AddChunk(stream.Current())
		}
		if err := stream.Err(); err != nil {
			t.Fatalf("streaming: %v", err)
		}
		stream.Close()
		if len(acc.Choices) != n {
			t.Fatalf("streamed %d choices, want %d", len(acc.Choices), n)
		}
		for i, c := range acc.Choices {
			check("streamed chat", i, c.Index, c.Message.Content, c.FinishReason, len(c.Logprobs.Content), wantChat)
		}
		checkUsage("streamed chat", acc.Usage.PromptTokens, acc.Usage.CompletionTokens, chatUsage)

		tparams := openai.CompletionNewParams{
			Model:       "demo",
			Prompt:      openai.CompletionNewParamsPromptUnion{OfString: openai.String(testPrompt)},
			MaxTokens:   openai.Int(maxTokens),
			Temperature: openai.Float(1),
			Seed:        openai.Int(seed),
			N:           openai.Int(n),
			Logprobs:    openai.Int(1),
		}
		text, err := client.Completions.New(ctx, tparams)
		if err != nil {
			t.Fatalf("Completions.New: %v", err)
		}
		if len(text.Choices) != n {
			t.Fatalf("%d text choices, want %d", len(text.Choices), n)
		}
		for i, c := range text.Choices {
			check("whole text", i, c.Index, c.Text, string(c.FinishReason), len(c.Logprobs.Tokens), wantText)
		}
		checkUsage("whole text", text.Usage.PromptTokens, text.Usage.CompletionTokens, textUsage)
		tparams.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
		tstream := client.Completions.NewStreaming(ctx, tparams)
		texts, finishes, lps := make([]string, n), make([]string, n), make([]int, n)
		var tusage openai.CompletionUsage
		for tstream.Next() {
			ch := tstream.Current()
			for _, c := range ch.Choices {
				if c.Index < 0 || c.Index >= n {
					t.Fatalf("streamed text choice index %d", c.Index)
				}
				texts[c.Index] += c.Text
				lps[c.Index] += len(c.Logprobs.Tokens)
				if c.FinishReason != "" {
					finishes[c.Index] = string(c.FinishReason)
				}
			}
			if ch.Usage.TotalTokens > 0 {
				tusage = ch.Usage
			}
		}
		if err := tstream.Err(); err != nil {
			t.Fatalf("streaming text: %v", err)
		}
		tstream.Close()
		for i := range n {
			check("streamed text", i, int64(i), texts[i], finishes[i], lps[i], wantText)
		}
		checkUsage("streamed text", tusage.PromptTokens, tusage.CompletionTokens, textUsage)

		params.N = openai.Int(infer.MaxChoices + 1)
		_, err = client.Chat.Completions.New(ctx, params)
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusBadRequest || apiErr.Param != "n" {
			t.Errorf("n %d: error %v, want a 400 *openai.Error naming n", infer.MaxChoices+1, err)
		}
	})

	t.Run("npm over TCP", func(t *testing.T) {
		out := runNode(t, "choices.mjs", map[string]any{"url": s.base, "prompt": testPrompt, "maxTokens": maxTokens, "n": n, "seed": seed, "apiKey": s.bearer(t)},
			"NODE_EXTRA_CA_CERTS="+s.caFile)
		type choice struct {
			Index        int64
			Text, Finish string
			Logprobs     int
		}
		type usage struct {
			PromptTokens     int64 `json:"prompt_tokens"`
			CompletionTokens int64 `json:"completion_tokens"`
		}
		type answer struct {
			Choices []choice
			Ended   []int
			Usage   *usage
		}
		var got struct {
			Chat, ChatStream, Text, TextStream answer
			Refused                            *struct {
				Status int
				Param  *string
			}
		}
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("choices.mjs printed %q: %v", out, err)
		}
		for _, a := range []struct {
			what  string
			got   answer
			want  []choiceWant
			usage infer.Done
		}{
			{"whole chat", got.Chat, wantChat, chatUsage},
			{"streamed chat", got.ChatStream, wantChat, chatUsage},
			{"whole text", got.Text, wantText, textUsage},
			{"streamed text", got.TextStream, wantText, textUsage},
		} {
			if len(a.got.Choices) != n || a.got.Usage == nil {
				t.Errorf("%s: %d choices, usage %v; want %d and usage", a.what, len(a.got.Choices), a.got.Usage, n)
				continue
			}
			for i, c := range a.got.Choices {
				check(a.what, i, c.Index, c.Text, c.Finish, c.Logprobs, a.want)
			}
			checkUsage(a.what, a.got.Usage.PromptTokens, a.got.Usage.CompletionTokens, a.usage)
			if strings.HasPrefix(a.what, "streamed") && len(a.got.Ended) != n {
				t.Errorf("%s: choices ended %v, want each once", a.what, a.got.Ended)
			}
		}
		if r := got.Refused; r == nil || r.Status != http.StatusBadRequest || r.Param == nil || *r.Param != "n" {
			t.Errorf("n 17: got %+v, want a 400 naming n", r)
		}
	})
}

// A stream of several choices whose client leaves is cancelled on the
// worker, every choice's row with it; one whose worker dies mid-stream
// ends with the worker_lost error event, not a [DONE] that would pass
// the cut-off choices as whole.
func TestEndToEndChoicesCancelAndWorkerLost(t *testing.T) {
	s := startServer(t)
	c := s.h3Client(t)
	body := longStreamBody()
	body["n"] = 3

	// firstToken reads the stream until a choice's text arrives.
	firstToken := func(sc *bufio.Scanner) {
		t.Helper()
		for sc.Scan() {
			if strings.Contains(sc.Text(), `"text":"`) && !strings.Contains(sc.Text(), `"text":""`) {
				return
			}
		}
		t.Fatalf("the stream ended before its first token: %v", sc.Err())
	}

	cancelled := metric(t, s, "h3infer_worker_sequences_cancelled_total")
	ctx, cancel := context.WithCancel(context.Background())
	resp := postJSON(t, ctx, c, s.base+"/v1/completions", body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %s", resp.Status)
	}
	firstToken(bufio.NewScanner(resp.Body))
	cancel()
	resp.Body.Close()
	pollUntil(t, "the worker to drop the cancelled choices", 10*time.Second, func() bool {
		return metric(t, s, "h3infer_worker_sequences_cancelled_total") > cancelled &&
			metric(t, s, "h3infer_worker_in_flight_sequences") == 0
	})

	resp = postJSON(t, context.Background(), c, s.base+"/v1/completions", body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %s", resp.Status)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	firstToken(sc)
	for _, w := range workersState(t, s) {
		if w.PID != 0 {
			syscall.Kill(w.PID, syscall.SIGKILL)
		}
	}
	var last string
	for sc.Scan() {
		if data, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			last = data
			if data == "[DONE]" {
				t.Fatal("the stream ended with [DONE] after its worker died")
			}
		}
	}
	var ev struct {
		Error *struct{ Code string } `json:"error"`
	}
	if json.Unmarshal([]byte(last), &ev); ev.Error == nil || ev.Error.Code != infer.CodeWorkerLost {
		t.Errorf("last event %q, want the worker_lost error", last)
	}
}
