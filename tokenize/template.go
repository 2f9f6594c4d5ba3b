package backend

import (
	"fmt"
	"slices"
	"strings"

	"h3infer/infer"
)

// Chat templates turn a conversation into the prompt text the model
// continues. Each is written in Go after the format its model family was
// trained on; model.json's chat_template picks one by name.
const (
	// TemplatePlain writes each message's content followed by "\n",
	// ignoring roles; the model then continues as the assistant. It suits
	// the demo model, which was never trained on any chat format.
	TemplatePlain = "plain"
	// TemplateChatML writes "<|im_start|>ROLE\nCONTENT<|im_end|>\n" per
	// message and ends with "<|im_start|>assistant\n" (Qwen and many
	// others).
	TemplateChatML = "chatml"
	// TemplateLlama3 writes "<|begin_of_text|>", then per message
	// "<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>" with
	// the content trimmed, and ends with the assistant's header.
	TemplateLlama3 = "llama3"
	// TemplateLlama2 writes "<s>[INST] USER [/INST] ASSISTANT </s>" per
	// exchange, the system message wrapped in <<SYS>> inside the first
	// instruction, and ends with the last user message's "[/INST]".
	TemplateLlama2 = "llama2"
	// TemplateMistral is Llama 2's [INST] format without <<SYS>>: a system
	// message is put before the first user message, and an answer is
	// followed directly by "</s>".
	TemplateMistral = "mistral"
	// TemplateGemma writes "<bos>", then per message
	// "<start_of_turn>ROLE\nCONTENT<end_of_turn>\n" with the assistant
	// called "model", and ends with "<start_of_turn>model\n". Gemma has
	// no system role: a system message is put before the first user
	// message.
	TemplateGemma = "gemma"
	// TemplatePhi3 writes "<|ROLE|>\nCONTENT<|end|>\n" per message and
	// ends with "<|assistant|>\n".
	TemplatePhi3 = "phi3"
	// TemplateZephyr writes "<|ROLE|>\nCONTENT</s>\n" per message and ends
	// with "<|assistant|>\n".
	TemplateZephyr = "zephyr"
)

// chatTemplate is one format: the special tokens it writes, which the
// tokenizer must have as tokens (else they would reach the model as plain
// characters), and the token that ends a turn, which stops generation.
type chatTemplate struct {
	markers   []string
	endOfTurn string
	apply     func(b *strings.Builder, msgs []infer.ChatMessage) error
}

// templateNames lists the templates in the order docs and errors give them.
func templateNames() []string {
	return []string{TemplatePlain, TemplateChatML, TemplateLlama3, TemplateLlama2, TemplateMistral, TemplateGemma, TemplatePhi3, TemplateZephyr}
}

func lookupTemplate(name string) (chatTemplate, bool) {
	switch name {
	case TemplatePlain:
		return chatTemplate{apply: func(b *strings.Builder, msgs []infer.ChatMessage) error {
			for _, m := range msgs {
				b.WriteString(m.Content)
				b.WriteByte('\n')
			}
			return nil
		}}, true
	case TemplateChatML:
		return chatTemplate{
			markers:   []string{"<|im_start|>", "<|im_end|>"},
			endOfTurn: "<|im_end|>",
			apply: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				for _, m := range msgs {
					fmt.Fprintf(b, "<|im_start|>%s\n%s<|im_end|>\n", m.Role, m.Content)
				}
				b.WriteString("<|im_start|>assistant\n")
				return nil
			},
		}, true
	case TemplateLlama3:
		return chatTemplate{
			markers:   []string{"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"},
			endOfTurn: "<|eot_id|>",
			apply: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				b.WriteString("<|begin_of_text|>")
				for _, m := range msgs {
					fmt.Fprintf(b, "<|start_header_id|>%s<|end_header_id|>\n\n%s<|eot_id|>", m.Role, strings.TrimSpace(m.Content))
				}
				b.WriteString("<|start_header_id|>assistant<|end_header_id|>\n\n")
				return nil
			},
		}, true
	case TemplateLlama2, TemplateMistral:
		return chatTemplate{
			markers:   []string{"<s>", "</s>"},
			endOfTurn: "</s>",
			apply: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				return applyInst(b, msgs, name == TemplateLlama2)
			},
		}, true
	case TemplateGemma:
		return chatTemplate{
			markers:   []string{"<bos>", "<start_of_turn>", "<end_of_turn>"},
			endOfTurn: "<end_of_turn>",
			apply: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				b.WriteString("<bos>")
				for _, m := range foldSystem(msgs) {
					role := m.Role
					if role == "assistant" {
						role = "model"
					}
					fmt.Fprintf(b, "<start_of_turn>%s\n%s<end_of_turn>\n", role, strings.TrimSpace(m.Content))
				}
				b.WriteString("<start_of_turn>model\n")
				return nil
			},
		}, true
	case TemplatePhi3:
		return chatTemplate{
			markers:   []string{"<|user|>", "<|assistant|>", "<|end|>"},
			endOfTurn: "<|end|>",
			apply: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				for _, m := range msgs {
					fmt.Fprintf(b, "<|%s|>\n%s<|end|>\n", m.Role, m.Content)
				}
				b.WriteString("<|assistant|>\n")
				return nil
			},
		}, true
	case TemplateZephyr:
		// Zephyr's role tags are ordinary text to its tokenizer; only the
		// end-of-sequence token is special.
		return chatTemplate{
			markers:   []string{"</s>"},
			endOfTurn: "</s>",
			apply: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				for _, m := range msgs {
					fmt.Fprintf(b, "<|%s|>\n%s</s>\n", m.Role, m.Content)
				}
				b.WriteString("<|assistant|>\n")
				return nil
			},
		}, true
	}
	return chatTemplate{}, false
}

func validTemplate(name string) bool {
	_, ok := lookupTemplate(name)
	return ok
}

// applyTemplate renders msgs. Errors are *RequestError: a conversation the
// format cannot express is the request's fault.
func applyTemplate(name string, msgs []infer.ChatMessage) (string, error) {
	t, ok := lookupTemplate(name)
	if !ok {
		return "", fmt.Errorf("unknown chat template %q", name)
	}
	var b strings.Builder
	if err := t.apply(&b, msgs); err != nil {
		return "", err
	}
	return b.String(), nil
}

// foldSystem puts leading system messages in front of the first user
// message, for formats without a system role.
func foldSystem(msgs []infer.ChatMessage) []infer.ChatMessage {
	var sys []string
	i := 0
	for ; i < len(msgs) && msgs[i].Role == "system"; i++ {
		sys = append(sys, strings.TrimSpace(msgs[i].Content))
	}
	if len(sys) == 0 {
		return msgs
	}
	rest := slices.Clone(msgs[i:])
	prefix := strings.Join(sys, "\n\n")
	if len(rest) > 0 && rest[0].Role == "user" {
		rest[0].Content = prefix + "\n\n" + strings.TrimSpace(rest[0].Content)
		return rest
	}
	return append([]infer.ChatMessage{{Role: "user", Content: prefix}}, rest...)
}

// applyInst writes the [INST] format of Llama 2 (llama2 set: the system
// message in <<SYS>>) or Mistral. Turns must alternate user, assistant,
// ..., user after an optional system message, as both formats require.
func applyInst(b *strings.Builder, msgs []infer.ChatMessage, llama2 bool) error {
	var sys string
	if len(msgs) > 0 && msgs[0].Role == "system" {
		sys, msgs = strings.TrimSpace(msgs[0].Content), msgs[1:]
	}
	for i, m := range msgs {
		want := "user"
		if i%2 == 1 {
			want = "assistant"
		}
		if m.Role != want {
			return &RequestError{infer.CodeInvalidRequest, fmt.Sprintf(
				"messages[%d]: this model's chat format needs turns to alternate user and assistant after an optional first system message, got %q where %q belongs", i, m.Role, want)}
		}
	}
	if len(msgs)%2 == 0 {
		return &RequestError{infer.CodeInvalidRequest, "this model's chat format needs the conversation to end with a user message"}
	}
	if !llama2 {
		b.WriteString("<s>")
	}
	for i, m := range msgs {
		content := strings.TrimSpace(m.Content)
		if m.Role == "assistant" {
			if llama2 {
				fmt.Fprintf(b, " %s </s>", content)
			} else {
				fmt.Fprintf(b, "%s</s>", content)
			}
			continue
		}
		if i == 0 && sys != "" {
			if llama2 {
				content = "<<SYS>>\n" + sys + "\n<</SYS>>\n\n" + content
			} else {
				content = sys + "\n\n" + content
			}
		}
		if llama2 {
			b.WriteString("<s>")
		}
		fmt.Fprintf(b, "[INST] %s [/INST]", content)
	}
	return nil
}
