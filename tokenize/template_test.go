package tokenize

import (
	"errors"
	"testing"

	"h3infer/infer"
)

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
			got, err := render(t, tc.name, tc.msgs, true)
			if err != nil || got != tc.want {
				t.Errorf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	for _, name := range TemplateNames() {
		if _, ok := LookupTemplate(name); !ok {
			t.Errorf("listed template %q is not valid", name)
		}
	}
	if _, ok := LookupTemplate("jinja"); ok {
		t.Error("unknown template accepted")
	}
	// [INST] formats cannot express these conversations.
	for name, m := range map[string][]infer.ChatMessage{
		"two users":        msgs("user", "a", "user", "b"),
		"ends with answer": msgs("user", "a", "assistant", "b"),
		"starts with bot":  msgs("assistant", "a", "user", "b"),
	} {
		_, err := render(t, TemplateLlama2, m, true)
		if _, ok := errors.AsType[*ConversationError](err); !ok {
			t.Errorf("%s: got %v, want a conversation the format cannot express", name, err)
		}
	}
}

// TestTemplatesWithoutGenerationPrompt checks that the named templates
// leave out the assistant's opening when asked, as a Jinja template does.
func TestTemplatesWithoutGenerationPrompt(t *testing.T) {
	msgs := []infer.ChatMessage{{Role: "user", Content: "Hi"}}
	tests := map[string]string{
		TemplatePlain:   "Hi\n",
		TemplateChatML:  "<|im_start|>user\nHi<|im_end|>\n",
		TemplateLlama3:  "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
		TemplateLlama2:  "<s>[INST] Hi [/INST]",
		TemplateGemma:   "<bos><start_of_turn>user\nHi<end_of_turn>\n",
		TemplatePhi3:    "<|user|>\nHi<|end|>\n",
		TemplateZephyr:  "<|user|>\nHi</s>\n",
		TemplateMistral: "<s>[INST] Hi [/INST]",
	}
	for name, want := range tests {
		if got, err := render(t, name, msgs, false); err != nil || got != want {
			t.Errorf("%s: got %q, %v; want %q", name, got, err, want)
		}
	}
}

func render(t *testing.T, name string, msgs []infer.ChatMessage, addGenerationPrompt bool) (string, error) {
	t.Helper()
	tmpl, ok := LookupTemplate(name)
	if !ok {
		t.Fatalf("no template %q", name)
	}
	return tmpl.Render(msgs, addGenerationPrompt)
}
