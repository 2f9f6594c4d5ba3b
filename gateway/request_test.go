package gateway

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"h3infer/infer"
)

// FuzzParseCompletion checks that any body either fails with an error the
// client can act on or yields a job within the documented bounds.
func FuzzParseCompletion(f *testing.F) {
	seeds, err := filepath.Glob("testdata/requests/*.json")
	if err != nil {
		f.Fatal(err)
	}
	for _, name := range seeds {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false)
		f.Add(b, true)
	}
	f.Fuzz(func(t *testing.T, body []byte, text bool) {
		kind := kindChat
		if text {
			kind = kindText
		}
		c, err := parseCompletion(body, kind, DefaultMaxTokens)
		if err != nil {
			if e := apiErrorOf(err); e.status != 400 {
				t.Fatalf("a bad body maps to %d, want 400: %v", e.status, err)
			}
			return
		}
		j := c.job
		if c.model == "" || j.Model != c.model {
			t.Errorf("model %q job model %q", c.model, j.Model)
		}
		if j.MaxTokens == 0 {
			t.Error("max tokens 0")
		}
		if math.IsNaN(float64(j.Temperature)) || j.Temperature < 0 || j.Temperature > 2 {
			t.Errorf("temperature %v", j.Temperature)
		}
		if !(j.TopP > 0 && j.TopP <= 1) {
			t.Errorf("top_p %v", j.TopP)
		}
		if len(j.Stop) > maxStopSequences {
			t.Errorf("%d stop sequences", len(j.Stop))
		}
		if kind == kindChat && len(j.Messages) == 0 {
			t.Error("chat job without messages")
		}
		if kind == kindText && j.Messages != nil {
			t.Error("text job with messages")
		}
		if c.includeUsage && !c.stream {
			t.Error("include_usage without stream")
		}
		if !(j.MinP >= 0 && j.MinP <= 1) || !(j.RepetitionPenalty >= 0 && j.RepetitionPenalty <= 2) ||
			!(j.PresencePenalty >= -2 && j.PresencePenalty <= 2) || !(j.FrequencyPenalty >= -2 && j.FrequencyPenalty <= 2) {
			t.Errorf("sampling out of range: %+v", j)
		}
		if len(j.LogitBias) > maxLogitBias {
			t.Errorf("%d logit_bias entries", len(j.LogitBias))
		}
		for i, lb := range j.LogitBias {
			if !(lb.Bias >= -100 && lb.Bias <= 100) || i > 0 && lb.Token <= j.LogitBias[i-1].Token {
				t.Errorf("logit_bias %+v: out of range or not ascending", j.LogitBias)
			}
		}
	})
}

func TestSamplingParameters(t *testing.T) {
	c, err := parseCompletion([]byte(`{"model": "m", "prompt": "p", "top_k": 40, "min_p": 0.05,
		"presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 1.1,
		"logit_bias": {"50256": -100, "13": 2.5, "0": 0}}`), kindText, DefaultMaxTokens)
	if err != nil {
		t.Fatal(err)
	}
	j := c.job
	if j.TopK != 40 || j.MinP != 0.05 || j.PresencePenalty != -2 || j.FrequencyPenalty != 2 || j.RepetitionPenalty != float32(1.1) {
		t.Errorf("got %+v", j)
	}
	want := []infer.LogitBias{{Token: 0, Bias: 0}, {Token: 13, Bias: 2.5}, {Token: 50256, Bias: -100}}
	if !slices.Equal(j.LogitBias, want) {
		t.Errorf("logit_bias: got %v, want %v (ascending)", j.LogitBias, want)
	}
	if c, err := parseCompletion([]byte(`{"model": "m", "prompt": "p", "top_k": -1, "logit_bias": null}`), kindText, DefaultMaxTokens); err != nil || c.job.TopK != 0 || c.job.LogitBias != nil {
		t.Errorf("top_k -1, logit_bias null: got %+v, %v; want off", c, err)
	}

	for body, param := range map[string]string{
		`"top_k": -2`:                     "top_k",
		`"top_k": 1.5`:                    "top_k",
		`"min_p": 1.5`:                    "min_p",
		`"min_p": -0.1`:                   "min_p",
		`"presence_penalty": 2.5`:         "presence_penalty",
		`"frequency_penalty": -3`:         "frequency_penalty",
		`"repetition_penalty": 0`:         "repetition_penalty",
		`"repetition_penalty": 2.01`:      "repetition_penalty",
		`"logit_bias": [1, 2]`:            "logit_bias",
		`"logit_bias": {"a": 1}`:          "logit_bias",
		`"logit_bias": {"-1": 1}`:         "logit_bias",
		`"logit_bias": {"4294967296": 1}`: "logit_bias",
		`"logit_bias": {"5": 101}`:        "logit_bias",
		`"logit_bias": {"5": "1"}`:        "logit_bias",
		`"logit_bias": {"5": 1, "05": 2}`: "logit_bias",
	} {
		_, err := parseCompletion([]byte(`{"model": "m", "prompt": "p", `+body+`}`), kindText, DefaultMaxTokens)
		e := apiErrorOf(err)
		if err == nil || e.status != 400 || paramOf(e) != param {
			t.Errorf("%s: got %v (status %d, param %q), want 400 naming %q", body, err, e.status, paramOf(e), param)
		}
	}
	many := make([]string, maxLogitBias+1)
	for i := range many {
		many[i] = fmt.Sprintf("%q: 1", fmt.Sprint(i))
	}
	if _, err := parseCompletion([]byte(`{"model": "m", "prompt": "p", "logit_bias": {`+strings.Join(many, ",")+`}}`), kindText, DefaultMaxTokens); paramOf(apiErrorOf(err)) != "logit_bias" {
		t.Errorf("%d logit_bias entries: got %v, want refused", len(many), err)
	}
}

func TestSeedRequestsParse(t *testing.T) {
	tests := map[string]struct {
		kind apiKind
		ok   bool
	}{
		"chat_stream.json":   {kindChat, true},
		"chat_parts.json":    {kindChat, true},
		"text_array.json":    {kindText, true},
		"text_nulls.json":    {kindText, true},
		"chat_edge.json":     {kindChat, false}, // max_tokens beyond uint32
		"chat_sampling.json": {kindChat, true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("testdata/requests", name))
			if err != nil {
				t.Fatal(err)
			}
			_, err = parseCompletion(b, tc.kind, DefaultMaxTokens)
			if (err == nil) != tc.ok {
				t.Errorf("parse error %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

func paramOf(e apiError) string {
	if e.body.Param == nil {
		return ""
	}
	return *e.body.Param
}

// TestUnknownAndUnsupportedParameters: a parameter the server does not
// know, or one of OpenAI's it does not implement set to anything but a
// value that asks for nothing, is a 400 naming it; hints are ignored.
func TestUnknownAndUnsupportedParameters(t *testing.T) {
	for body, param := range map[string]string{
		// Refused: unknown, or asking for what is not implemented.
		`"best_of_n": 2`:                                  "best_of_n",
		`"skip_special_tokens": false`:                    "skip_special_tokens",
		`"response_format": {"type": "xml"}`:              "response_format",
		`"tools": [{"type": "function", "function": {}}]`: "tools",
		`"tool_choice": "required"`:                       "tool_choice",
		`"functions": [{"name": "f"}]`:                    "functions",
		`"function_call": {"name": "f"}`:                  "function_call",
		`"audio": {"voice": "alloy"}`:                     "audio",
		`"modalities": ["text", "audio"]`:                 "modalities",
		`"prediction": {"type": "content"}`:               "prediction",
		`"reasoning_effort": "low"`:                       "reasoning_effort",
		`"best_of": 3`:                                    "best_of",
		`"echo": true`:                                    "echo",
		`"suffix": "end"`:                                 "suffix",
		// Accepted: values that ask for nothing, and hints.
		`"response_format": { "type" : "text" }`:     "",
		`"response_format": {"type": "json_object"}`: "",
		`"tools": []`:                               "",
		`"tool_choice": "none"`:                     "",
		`"modalities": ["text"]`:                    "",
		`"best_of": 1`:                              "",
		`"echo": false`:                             "",
		`"metadata": {"k": "v"}`:                    "",
		`"store": true`:                             "",
		`"service_tier": "auto"`:                    "",
		`"prompt_cache_key": "k"`:                   "",
		`"safety_identifier": "s"`:                  "",
		`"parallel_tool_calls": true`:               "",
		`"priority": 5`:                             "",
		`"user": "u", "stream_options": null`:       "",
		`"max_completion_tokens": 8, "seed": 1`:     "",
		`"ignore_eos": true, "top_k": 5, "n": 1`:    "",
		`"frequency_penalty": 0, "min_p": 0`:        "",
		`"presence_penalty": 0, "logit_bias": null`: "",
	} {
		_, err := parseCompletion([]byte(`{"model": "m", "prompt": "p", `+body+`}`), kindText, DefaultMaxTokens)
		switch e := apiErrorOf(err); {
		case param == "" && err != nil:
			t.Errorf("%s: refused (%v); want it accepted", body, err)
		case param != "" && (err == nil || e.status != 400 || paramOf(e) != param):
			t.Errorf("%s: got %v (param %q); want 400 naming %q", body, err, paramOf(e), param)
		}
	}
	// Trailing bytes after the object are still malformed JSON.
	if _, err := parseCompletion([]byte(`{"model": "m", "prompt": "p"} x`), kindText, DefaultMaxTokens); apiErrorOf(err).status != 400 {
		t.Errorf("trailing bytes: got %v, want 400", err)
	}
}

func TestLogprobsParameters(t *testing.T) {
	for _, tc := range []struct {
		kind  apiKind
		body  string
		param string // "" when accepted
		lp    bool
		top   uint8
	}{
		{kindChat, `"logprobs": true`, "", true, 0},
		{kindChat, `"logprobs": true, "top_logprobs": 20`, "", true, 20},
		{kindChat, `"logprobs": false, "top_logprobs": 0`, "", false, 0},
		{kindChat, `"logprobs": null`, "", false, 0},
		{kindChat, `"logprobs": true, "top_logprobs": 21`, "top_logprobs", false, 0},
		{kindChat, `"logprobs": true, "top_logprobs": -1`, "top_logprobs", false, 0},
		{kindChat, `"top_logprobs": 3`, "top_logprobs", false, 0},
		{kindChat, `"logprobs": false, "top_logprobs": 3`, "top_logprobs", false, 0},
		{kindChat, `"logprobs": 3`, "logprobs", false, 0},
		{kindText, `"logprobs": 0`, "", true, 0},
		{kindText, `"logprobs": 5`, "", true, 5},
		{kindText, `"logprobs": 6`, "logprobs", false, 0},
		{kindText, `"logprobs": true`, "logprobs", false, 0},
		{kindText, `"logprobs": 2, "top_logprobs": 2`, "top_logprobs", false, 0},
	} {
		prompt := `"prompt": "p"`
		if tc.kind == kindChat {
			prompt = `"messages": [{"role": "user", "content": "p"}]`
		}
		c, err := parseCompletion([]byte(`{"model": "m", `+prompt+`, `+tc.body+`}`), tc.kind, DefaultMaxTokens)
		switch {
		case tc.param != "":
			if e := apiErrorOf(err); err == nil || e.status != 400 || paramOf(e) != tc.param {
				t.Errorf("%s: got %v; want 400 naming %q", tc.body, err, tc.param)
			}
		case err != nil:
			t.Errorf("%s: %v", tc.body, err)
		case c.job.Logprobs != tc.lp || c.job.TopLogprobs != tc.top:
			t.Errorf("%s: logprobs %v top %d, want %v %d", tc.body, c.job.Logprobs, c.job.TopLogprobs, tc.lp, tc.top)
		}
	}
}

// BenchmarkParseCompletion decodes and checks a chat request as an SDK
// sends it, on every request's path to its first token.
func BenchmarkParseCompletion(b *testing.B) {
	body := []byte(`{"model":"demo","messages":[{"role":"system","content":"You are helpful."},{"role":"user","content":"Tell me about HTTP/3 and QUIC in a few words."}],"max_tokens":64,"temperature":0.7,"stream":true,"stream_options":{"include_usage":true}}`)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := parseCompletion(body, kindChat, DefaultMaxTokens); err != nil {
			b.Fatal(err)
		}
	}
}

// TestResponseFormat: json_object and the subset of JSON Schema reach the
// worker compacted; anything else is a 400 naming response_format and
// saying where in the schema the fault is.
func TestResponseFormat(t *testing.T) {
	const schema = `{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": false}`
	for _, tc := range []struct {
		format, want, refusal string
	}{
		{`{"type": "json_object"}`, `{"type":"json_object"}`, ""},
		{`{"type": "text"}`, "", ""},
		{`null`, "", ""},
		{`{"type": "json_schema", "json_schema": {"name": "a", "strict": true, "schema": ` + schema + `}}`,
			`{"type":"json_schema","json_schema":{"name":"a","strict":true,"schema":{"type":"object","properties":{"a":{"type":"string"}},"required":["a"],"additionalProperties":false}}}`, ""},
		{`{"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": {"x": {"type": "object", "patternProperties": {}}}, "required": ["x"]}}}`,
			"", `response_format.json_schema.schema.properties.x: "patternProperties" is not supported here`},
		{`{"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "string"}}}`, "", "response_format.json_schema.schema: the root must be an object"},
		{`{"type": "json_schema", "json_schema": {"schema": ` + schema + `}}`, "", "response_format.json_schema.name: must be"},
		{`{"type": "json_schema", "json_schema": {"name": "a", "schema": ` + strings.Repeat(`{"type":"array","items":`, 40) + `{"type":"null"}` + strings.Repeat(`}`, 40) + `}}`, "", "nest more than"},
	} {
		body := `{"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": ` + tc.format + `}`
		c, err := parseCompletion([]byte(body), kindChat, 16)
		if tc.refusal != "" {
			if err == nil || !strings.Contains(err.Error(), tc.refusal) {
				t.Errorf("%s: got %v, want an error with %q", tc.format, err, tc.refusal)
			}
			if e := apiErrorOf(err); e.status != 400 || paramOf(e) != "response_format" {
				t.Errorf("%s: got status %d naming %q, want 400 naming response_format", tc.format, e.status, paramOf(e))
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.format, err)
			continue
		}
		if c.job.ResponseFormat != tc.want {
			t.Errorf("%s: got %q, want %q", tc.format, c.job.ResponseFormat, tc.want)
		}
	}
}
