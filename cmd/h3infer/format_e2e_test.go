package main

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/shared"
	"github.com/santhosh-tekuri/jsonschema/v6"
)

// TestSDKResponseFormat sends a json_schema response_format through
// openai-go's own types to the real server and demo model, streamed and
// not: both answers agree, parse and validate against the schema with a
// validator nobody here wrote; a schema outside the subset comes back as
// the SDK's typed 400 naming response_format.
func TestSDKResponseFormat(t *testing.T) {
	s := startServer(t)
	ctx := context.Background()
	client := goSDK(t, s)
	// No free strings: the demo model, which writes prose, would fill
	// one to max_tokens.
	const schemaText = `{"type":"object","properties":{"n":{"type":"integer"},"ok":{"type":"boolean"},
		"color":{"enum":["red","green","blue"]},"xs":{"type":"array","items":{"type":["integer","null"]},"maxItems":3}},
		"required":["n","ok","color","xs"],"additionalProperties":false}`
	schemaDoc, err := jsonschema.UnmarshalJSON(strings.NewReader(schemaText))
	if err != nil {
		t.Fatal(err)
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource("schema.json", schemaDoc); err != nil {
		t.Fatal(err)
	}
	validator, err := c.Compile("schema.json")
	if err != nil {
		t.Fatal(err)
	}
	// The validator's document keeps numbers as json.Number, which the
	// SDK would send as strings: the SDK gets its own.
	var schema map[string]any
	if err := json.Unmarshal([]byte(schemaText), &schema); err != nil {
		t.Fatal(err)
	}
	for seed := range int64(5) {
		params := openai.ChatCompletionNewParams{
			Model:       "demo",
			Messages:    []openai.ChatCompletionMessageParamUnion{openai.UserMessage(testPrompt)},
			MaxTokens:   openai.Int(200),
			Temperature: openai.Float(1),
			Seed:        openai.Int(seed),
			ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &shared.ResponseFormatJSONSchemaParam{
				JSONSchema: shared.ResponseFormatJSONSchemaJSONSchemaParam{Name: "answer", Strict: openai.Bool(true), Schema: schema},
			}},
		}
		full, err := client.Chat.Completions.New(ctx, params)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		got := full.Choices[0].Message.Content
		if full.Choices[0].FinishReason != "stop" {
			t.Fatalf("seed %d: finish %q with %q, want stop", seed, full.Choices[0].FinishReason, got)
		}
		v, err := jsonschema.UnmarshalJSON(strings.NewReader(got))
		if err != nil {
			t.Fatalf("seed %d: %q does not parse: %v", seed, got, err)
		}
		if err := validator.Validate(v); err != nil {
			t.Fatalf("seed %d: %q does not validate: %v", seed, got, err)
		}
		stream := client.Chat.Completions.NewStreaming(ctx, params)
		var acc openai.ChatCompletionAccumulator
		for stream.Next() {
			acc.AddChunk(stream.Current())
		}
		if err := stream.Err(); err != nil {
			t.Fatalf("seed %d: streaming: %v", seed, err)
		}
		stream.Close()
		if acc.Choices[0].Message.Content != got {
			t.Errorf("seed %d: streamed %q, non-streamed %q", seed, acc.Choices[0].Message.Content, got)
		}
	}

	_, err = client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model:    "demo",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(testPrompt)},
		ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &shared.ResponseFormatJSONSchemaParam{
			JSONSchema: shared.ResponseFormatJSONSchemaJSONSchemaParam{Name: "answer", Schema: map[string]any{
				"type": "object", "properties": map[string]any{"s": map[string]any{"type": "string", "pattern": "^a+$"}}, "required": []string{"s"},
			}},
		}},
	})
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusBadRequest || apiErr.Param != "response_format" || !strings.Contains(apiErr.Message, `"pattern"`) {
		t.Errorf("pattern: got %v, want a 400 naming response_format and pattern", err)
	}
}
