package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
)

// deepseekToolsBlock is what the test adds to DeepSeek V3's template,
// whose published text never shows the model its tools: the functions
// and how to call them, after the system prompt.
const deepseekToolsBlock = `{%- if tools %}{{ '\n\n## Tools\n' }}{%- for tool in tools %}{{ '\n### ' + tool.function.name + '\n' + (tool.function.parameters | tojson) }}{%- endfor %}{{ '\nCall as <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n` + "```json\\n{...}\\n```" + `<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n' }}{%- endif %}`

// startDeepseekToolServer serves DeepSeek V3's real tokenizer and chat
// template (with deepseekToolsBlock) beside random weights.
func startDeepseekToolServer(t *testing.T) (*server, string) {
	t.Helper()
	src := filepath.Join(refDir, "node_modules", "@lenml", "tokenizer-deepseek_v3", "models")
	dir := t.TempDir()
	cfg, err := os.ReadFile(filepath.Join(src, "tokenizer_config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		Template string `json:"chat_template"`
	}
	if err := json.Unmarshal(cfg, &c); err != nil {
		t.Fatal(err)
	}
	const at = "{{bos_token}}{{ns.system_prompt}}"
	if !strings.Contains(c.Template, at) {
		t.Fatalf("DeepSeek V3's template has no %q", at)
	}
	tok, err := os.ReadFile(filepath.Join(src, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"tokenizer.json": tok, "tokenizer_config.json": cfg,
		"chat_template.jinja": []byte(strings.Replace(c.Template, at, at+deepseekToolsBlock, 1))} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return serveRandomModel(t, dir, "deepseek-v3-random", 11)
}

// TestSDKToolCallsDeepSeekV3 forces calls from a random-weight model
// with DeepSeek V3's tokenizer, whose calls are written in its marker
// tokens, through openai-go over HTTP/3: every answer is one call whose
// arguments validate against the function's schema (a validator nobody
// here wrote), with no marker in content, and the streamed answer opens
// the call once and sends its arguments in several deltas that add up
// to the whole answer's.
func TestSDKToolCallsDeepSeekV3(t *testing.T) {
	s, model := startDeepseekToolServer(t)
	ctx := t.Context()
	client := goSDK(t, s)
	tools, validArgs := toolDefs(t)
	for seed := range int64(6) {
		choice := openai.ChatCompletionToolChoiceOptionUnionParam{OfAuto: openai.String("required")}
		if seed%2 == 1 {
			choice = openai.ToolChoiceOptionFunctionToolChoice(openai.ChatCompletionNamedToolChoiceFunctionParam{Name: "set_alarm"})
		}
		params := openai.ChatCompletionNewParams{
			Model: model, Tools: tools, ToolChoice: choice, MaxTokens: openai.Int(300), Temperature: openai.Float(1), Seed: openai.Int(seed),
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Wake me at 7 if it rains.")},
		}
		full, err := client.Chat.Completions.New(ctx, params)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		msg := full.Choices[0].Message
		if full.Choices[0].FinishReason != "tool_calls" || len(msg.ToolCalls) != 1 || msg.Content != "" {
			t.Fatalf("seed %d: finish %q, content %q, calls %+v; want one call", seed, full.Choices[0].FinishReason, msg.Content, msg.ToolCalls)
		}
		call := msg.ToolCalls[0].Function
		if seed%2 == 1 && call.Name != "set_alarm" {
			t.Errorf("seed %d: called %q, want set_alarm", seed, call.Name)
		}
		if err := validArgs(call.Name, call.Arguments); err != nil {
			t.Errorf("seed %d: %s(%s) does not validate: %v", seed, call.Name, call.Arguments, err)
		}
		t.Logf("seed %d: %s(%s)", seed, call.Name, call.Arguments)

		stream := client.Chat.Completions.NewStreaming(ctx, params)
		var acc openai.ChatCompletionAccumulator
		opens, argDeltas := 0, 0
		for stream.Next() {
			chunk := stream.Current()
			acc.AddChunk(chunk)
			for _, c := range chunk.Choices {
				if c.Delta.Content != "" {
					t.Errorf("seed %d: streamed content %q", seed, c.Delta.Content)
				}
				for _, d := range c.Delta.ToolCalls {
					if d.ID != "" {
						opens++
					} else if d.Function.Arguments != "" {
						argDeltas++
					}
				}
			}
		}
		if err := stream.Err(); err != nil {
			t.Fatalf("seed %d: streaming: %v", seed, err)
		}
		stream.Close()
		got := acc.Choices[0]
		if opens != 1 || argDeltas < 2 || got.FinishReason != "tool_calls" || len(got.Message.ToolCalls) != 1 ||
			got.Message.ToolCalls[0].Function.Name != call.Name || got.Message.ToolCalls[0].Function.Arguments != call.Arguments {
			t.Errorf("seed %d: streamed %d openings and %d argument deltas, finish %q, calls %+v; want %s(%s)", seed, opens, argDeltas, got.FinishReason, got.Message.ToolCalls, call.Name, call.Arguments)
		}
	}
}
