package main

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"

	"h3infer/infer"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// TestOfficialSDKs points OpenAI's own client libraries, unmodified, at the
// real server: whatever they cannot parse is a gateway bug.
func TestOfficialSDKs(t *testing.T) {
	s := startServer(t)
	const maxTokens = 40
	want := greedyChat(t, s, []map[string]string{{"role": "user", "content": testPrompt}}, maxTokens)
	// The text the sampling parameters the SDKs send below give in process.
	wantSampled, _ := inProcess(t, s, &infer.Request{
		Model: "demo", Messages: []infer.ChatMessage{{Role: "user", Content: testPrompt}},
		MaxTokens: maxTokens, Temperature: 0.8, Seed: 5, HasSeed: true, PresencePenalty: 0.5, FrequencyPenalty: 1,
		LogitBias: []infer.LogitBias{{Token: 3, Bias: -100}, {Token: 9, Bias: 3}}, TopK: 30, RepetitionPenalty: 1.2,
	})

	t.Run("go over HTTP/3", func(t *testing.T) {
		ctx := context.Background()
		client := goSDK(t, s)
		params := openai.ChatCompletionNewParams{
			Model:       "demo",
			Messages:    []openai.ChatCompletionMessageParamUnion{openai.UserMessage(testPrompt)},
			MaxTokens:   openai.Int(maxTokens),
			Temperature: openai.Float(0),
		}

		models, err := client.Models.List(ctx)
		if err != nil {
			t.Fatalf("Models.List: %v", err)
		}
		if len(models.Data) != 2 || models.Data[0].ID != "demo" || models.Data[1].ID != demoEncoder {
			t.Errorf("models %+v, want demo and %s", models.Data, demoEncoder)
		} else if task := models.Data[1].JSON.ExtraFields["task"]; task.Raw() != `"embed"` || models.Data[0].JSON.ExtraFields["task"].Valid() {
			t.Errorf("models' task: %s and %s, want the encoder's \"embed\" alone", models.Data[0].RawJSON(), models.Data[1].RawJSON())
		}

		var resp *http.Response
		full, err := client.Chat.Completions.New(ctx, params, option.WithResponseInto(&resp))
		if err != nil {
			t.Fatalf("Chat.Completions.New: %v", err)
		}
		if resp.ProtoMajor != 3 {
			t.Errorf("answered over %s, want HTTP/3", resp.Proto)
		}
		if len(full.Choices) != 1 || full.Choices[0].Message.Content != want.text || full.Choices[0].FinishReason != want.finish {
			t.Errorf("non-streamed choices %+v; want text %q, finish %q", full.Choices, want.text, want.finish)
		}
		if full.Usage.CompletionTokens != int64(want.tokens) || full.Usage.TotalTokens != full.Usage.PromptTokens+full.Usage.CompletionTokens {
			t.Errorf("usage %+v, want %d completion tokens and a consistent total", full.Usage, want.tokens)
		}

		params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
		stream := client.Chat.Completions.NewStreaming(ctx, params)
		var acc openai.ChatCompletionAccumulator
		chunks := 0
		for stream.Next() {
			chunks++
			acc.AddChunk(stream.Current())
		}
		if err := stream.Err(); err != nil {
			t.Fatalf("streaming: %v", err)
		}
		stream.Close()
		if chunks < 3 {
			t.Errorf("%d chunks; tokens should arrive as separate events", chunks)
		}
		if len(acc.Choices) != 1 || acc.Choices[0].Message.Content != want.text || acc.Choices[0].FinishReason != want.finish {
			t.Errorf("streamed choices %+v; want text %q, finish %q", acc.Choices, want.text, want.finish)
		}
		if acc.Usage.CompletionTokens != int64(want.tokens) {
			t.Errorf("streamed usage %+v, want %d completion tokens", acc.Usage, want.tokens)
		}

		text, err := client.Completions.New(ctx, openai.CompletionNewParams{
			Model:       "demo",
			Prompt:      openai.CompletionNewParamsPromptUnion{OfString: openai.String(testPrompt)},
			MaxTokens:   openai.Int(maxTokens),
			Temperature: openai.Float(0),
		})
		if err != nil {
			t.Fatalf("Completions.New: %v", err)
		}
		if len(text.Choices) != 1 || strings.TrimSpace(text.Choices[0].Text) == "" {
			t.Errorf("text completion choices %+v; want one with text", text.Choices)
		}

		// An error must come back as the SDK's typed error, status and all.
		_, err = client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
			Model:    "no-such-model",
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(testPrompt)},
		})
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusNotFound || apiErr.Message == "" {
			t.Errorf("unknown model: error %v, want a 404 *openai.Error with a message", err)
		}
	})

	t.Run("go sampling parameters", func(t *testing.T) {
		ctx := context.Background()
		client := goSDK(t, s)
		// OpenAI's own through the SDK's types; vLLM's as the SDK sends
		// any extension, a field set on the request body.
		params := openai.ChatCompletionNewParams{
			Model:            "demo",
			Messages:         []openai.ChatCompletionMessageParamUnion{openai.UserMessage(testPrompt)},
			MaxTokens:        openai.Int(maxTokens),
			Temperature:      openai.Float(0.8),
			Seed:             openai.Int(5),
			PresencePenalty:  openai.Float(0.5),
			FrequencyPenalty: openai.Float(1),
			LogitBias:        map[string]int64{"3": -100, "9": 3},
		}
		extensions := []option.RequestOption{option.WithJSONSet("top_k", 30), option.WithJSONSet("repetition_penalty", 1.2)}
		full, err := client.Chat.Completions.New(ctx, params, extensions...)
		if err != nil {
			t.Fatalf("Chat.Completions.New: %v", err)
		}
		if len(full.Choices) != 1 || full.Choices[0].Message.Content != wantSampled {
			t.Errorf("non-streamed %+v; want the model's text in process %q", full.Choices, wantSampled)
		}
		stream := client.Chat.Completions.NewStreaming(ctx, params, extensions...)
		var acc openai.ChatCompletionAccumulator
		for stream.Next() {
			acc.AddChunk(stream.Current())
		}
		if err := stream.Err(); err != nil {
			t.Fatalf("streaming: %v", err)
		}
		stream.Close()
		if len(acc.Choices) != 1 || acc.Choices[0].Message.Content != wantSampled {
			t.Errorf("streamed %+v; want %q", acc.Choices, wantSampled)
		}

		// Logprobs through the SDK's types: an entry per token, with its
		// two most likely alternatives, the same whole and streamed.
		params.Logprobs, params.TopLogprobs = openai.Bool(true), openai.Int(2)
		full, err = client.Chat.Completions.New(ctx, params, extensions...)
		if err != nil {
			t.Fatalf("with logprobs: %v", err)
		}
		content := full.Choices[0].Logprobs.Content
		var joined []byte
		for i, lp := range content {
			if lp.Logprob > 0 || len(lp.TopLogprobs) != 2 || lp.TopLogprobs[0].Logprob < lp.TopLogprobs[1].Logprob || lp.Logprob > lp.TopLogprobs[0].Logprob {
				t.Errorf("entry %d %+v: want a logprob <= 0 no likelier than the first of two alternatives, most likely first", i, lp)
			}
			for _, b := range lp.Bytes {
				joined = append(joined, byte(b))
			}
		}
		// The end token is a token too: its entry spells the vocabulary's
		// end marker, which the text leaves out.
		spelled := full.Choices[0].Message.Content
		if full.Choices[0].FinishReason == "stop" && len(content) > 0 {
			spelled += content[len(content)-1].Token
		}
		if int64(len(content)) != full.Usage.CompletionTokens || string(joined) != spelled {
			t.Errorf("%d entries for %d tokens, their bytes %q; want one per token, spelling %q",
				len(content), full.Usage.CompletionTokens, joined, spelled)
		}
		stream = client.Chat.Completions.NewStreaming(ctx, params, extensions...)
		acc = openai.ChatCompletionAccumulator{}
		for stream.Next() {
			acc.AddChunk(stream.Current())
		}
		if err := stream.Err(); err != nil {
			t.Fatalf("streaming with logprobs: %v", err)
		}
		stream.Close()
		streamed := acc.Choices[0].Logprobs.Content
		if len(streamed) != len(content) {
			t.Fatalf("streamed %d entries, whole %d", len(streamed), len(content))
		}
		for i := range content {
			if streamed[i].Token != content[i].Token || streamed[i].Logprob != content[i].Logprob {
				t.Errorf("entry %d: streamed %q %v, whole %q %v", i, streamed[i].Token, streamed[i].Logprob, content[i].Token, content[i].Logprob)
			}
		}
		// response_format through this SDK is TestSDKResponseFormat's.
	})

	t.Run("go embeddings over HTTP/3", func(t *testing.T) { testEmbeddingsGo(t, s) })

	t.Run("npm over TCP", func(t *testing.T) {
		out := runNode(t, "sdk.mjs", map[string]any{"url": s.base, "prompt": testPrompt, "maxTokens": maxTokens, "apiKey": s.bearer(t), "embedInputs": embedInputs},
			"NODE_EXTRA_CA_CERTS="+s.caFile)
		type usage struct {
			CompletionTokens int `json:"completion_tokens"`
			TotalTokens      int `json:"total_tokens"`
			PromptTokens     int `json:"prompt_tokens"`
		}
		var got struct {
			Models []string `json:"models"`
			AltSvc string   `json:"altSvc"`
			Full   struct {
				Text, Finish, Object string
				Usage                usage
			} `json:"full"`
			Stream struct {
				Text, Finish string
				Chunks       int
				Usage        *usage
			} `json:"stream"`
			Text     struct{ Text, Finish string } `json:"text"`
			Sampling struct{ Full, Stream string } `json:"sampling"`
			Format   []struct {
				Seed         int
				Full, Finish string
				Valid        bool
				Errors       []string
				Stream       struct {
					Text, Finish string
					Chunks       int
					Valid        bool
					Errors       []string
				}
			} `json:"format"`
			Refused *struct {
				Status         int
				Param, Message *string
			} `json:"refused"`
		}
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("sdk.mjs printed %q: %v", out, err)
		}
		checkEmbeddingsNode(t, s, out)
		if len(got.Models) != 2 || got.Models[0] != "demo" || got.Models[1] != demoEncoder {
			t.Errorf("models %v, want [demo %s]", got.Models, demoEncoder)
		}
		if !strings.Contains(got.AltSvc, `h3=":`) {
			t.Errorf("Alt-Svc %q over TCP, want h3 advertised", got.AltSvc)
		}
		if got.Full.Text != want.text || got.Full.Finish != want.finish || got.Full.Object != "chat.completion" || got.Full.Usage.CompletionTokens != want.tokens {
			t.Errorf("non-streamed %+v; want text %q, finish %q, %d tokens", got.Full, want.text, want.finish, want.tokens)
		}
		if got.Stream.Text != want.text || got.Stream.Finish != want.finish || got.Stream.Chunks < 3 {
			t.Errorf("streamed %q (finish %q, %d chunks); want %q, %q, several chunks", got.Stream.Text, got.Stream.Finish, got.Stream.Chunks, want.text, want.finish)
		}
		if got.Stream.Usage == nil || got.Stream.Usage.CompletionTokens != want.tokens {
			t.Errorf("streamed usage %+v, want %d completion tokens", got.Stream.Usage, want.tokens)
		}
		if strings.TrimSpace(got.Text.Text) == "" {
			t.Errorf("text completion %+v; want text", got.Text)
		}
		if got.Sampling.Full != wantSampled || got.Sampling.Stream != wantSampled {
			t.Errorf("sampling parameters: whole %q, streamed %q; want the model's text in process %q", got.Sampling.Full, got.Sampling.Stream, wantSampled)
		}
		// ajv judged each document in sdk.mjs; the streamed one must be
		// the same document, in pieces.
		if len(got.Format) != 3 {
			t.Fatalf("%d json_schema answers, want 3", len(got.Format))
		}
		for _, f := range got.Format {
			if f.Finish != "stop" || !f.Valid {
				t.Errorf("seed %d: %q (finish %q): ajv: %v; want a valid document and stop", f.Seed, f.Full, f.Finish, f.Errors)
			}
			if f.Stream.Text != f.Full || f.Stream.Finish != "stop" || !f.Stream.Valid || f.Stream.Chunks < 2 {
				t.Errorf("seed %d: streamed %q (finish %q, %d chunks, ajv: %v); want %q, stop, several chunks",
					f.Seed, f.Stream.Text, f.Stream.Finish, f.Stream.Chunks, f.Stream.Errors, f.Full)
			}
		}
		if r := got.Refused; r == nil || r.Status != http.StatusBadRequest || r.Param == nil || *r.Param != "response_format" ||
			r.Message == nil || !strings.Contains(*r.Message, "pattern") {
			t.Errorf("a pattern in the schema: got %+v, want a 400 naming response_format and pattern", r)
		}
	})
}

// goSDK is OpenAI's Go client pointed at s over HTTP/3, without retries.
func goSDK(t *testing.T, s *server) openai.Client {
	return openai.NewClient(
		option.WithBaseURL(s.base+"/v1/"),
		option.WithHTTPClient(s.h3Client(t)),
		option.WithAPIKey(s.bearer(t)),
		option.WithMaxRetries(0),
	)
}
