package backend

import (
	"errors"
	"strings"
	"testing"

	"h3infer/infer"
)

func TestParseModelConfig(t *testing.T) {
	tests := map[string]struct {
		in   string
		want []string // substrings of the error; none means valid
	}{
		"valid":          {`{"name":"demo","context_length":64,"eos_token":"<|endoftext|>","chat_template":"plain","stop_tokens":["<|endoftext|>"]}`, nil},
		"shape facts":    {`{"name":"d","context_length":8,"eos_token":"e","vocab_size":257,"num_layers":2,"num_heads":2,"head_dim":64}`, nil},
		"unknown key":    {`{"name":"d","context_length":8,"eos_token":"e","temperature":1}`, []string{`unknown field "temperature"`}},
		"every problem":  {`{"name":"","context_length":0,"eos_token":"","chat_template":"jinja","stop_tokens":[""]}`, []string{"name:", "context_length: must be > 0, got 0", "eos_token:", "chat_template:", "stop_tokens[0]:"}},
		"negative shape": {`{"name":"d","context_length":8,"eos_token":"e","num_heads":-1}`, []string{"num_heads: must be >= 0"}},
		"trailing data":  {`{"name":"d","context_length":8,"eos_token":"e"} {}`, []string{"trailing data"}},
		"wrong type":     {`{"name":"d","context_length":"8","eos_token":"e"}`, []string{"context_length"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := parseModelConfig([]byte(tc.in))
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("got %v, want no error", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("got no error, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func FuzzParseModelConfig(f *testing.F) {
	f.Add([]byte(`{"name":"demo","context_length":64,"eos_token":"<|endoftext|>","chat_template":"plain","stop_tokens":["<|endoftext|>"]}`))
	f.Add([]byte(`{"name":"d","context_length":8,"eos_token":"e","chat_template":"chatml"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := parseModelConfig(data)
		if err == nil && (c.Name == "" || c.ContextLength <= 0 || !validTemplate(c.ChatTemplate)) {
			t.Fatalf("accepted invalid config %+v", c)
		}
	})
}

func TestTemplates(t *testing.T) {
	msgs := func(pairs ...string) []infer.ChatMessage {
		var tm []infer.ChatMessage
		for i := 0; i < len(pairs); i += 2 {
			tm = append(tm, infer.ChatMessage{Role: pairs[i], Content: pairs[i+1]})
		}
		return tm
	}
	sysUser := msgs("system", "Be brief.", "user", "Hi")
	turns := msgs("system", "Be brief.", "user", "Hi", "assistant", "Hello.", "user", "Bye")
	tests := []struct {
		name string
		msgs []infer.ChatMessage
		want string
	}{
		{TemplatePlain, sysUser, "Be brief.\nHi\n"},
		{TemplateChatML, sysUser, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"},
		{TemplateLlama3, msgs("system", "Be brief. ", "user", " Hi"),
			"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" +
				"<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
		{TemplateLlama2, turns, "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]"},
		{TemplateLlama2, msgs("user", "Hi"), "<s>[INST] Hi [/INST]"},
		{TemplateMistral, turns, "<s>[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] Bye [/INST]"},
		{TemplateGemma, turns, "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n" +
			"<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"},
		{TemplateGemma, msgs("system", "Only a system message."), "<bos><start_of_turn>user\nOnly a system message.<end_of_turn>\n<start_of_turn>model\n"},
		{TemplatePhi3, sysUser, "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"},
		{TemplateZephyr, sysUser, "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := applyTemplate(tc.name, tc.msgs)
			if err != nil || got != tc.want {
				t.Errorf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	for _, name := range templateNames() {
		if !validTemplate(name) {
			t.Errorf("listed template %q is not valid", name)
		}
	}
	if _, err := applyTemplate("jinja", sysUser); err == nil {
		t.Error("unknown template accepted")
	}
	// [INST] formats cannot express these conversations.
	for name, m := range map[string][]infer.ChatMessage{
		"two users":        msgs("user", "a", "user", "b"),
		"ends with answer": msgs("user", "a", "assistant", "b"),
		"starts with bot":  msgs("assistant", "a", "user", "b"),
	} {
		_, err := applyTemplate(TemplateLlama2, m)
		if re, ok := errors.AsType[*RequestError](err); !ok || re.Code != infer.CodeInvalidRequest {
			t.Errorf("%s: got %v, want an invalid request", name, err)
		}
	}
}
