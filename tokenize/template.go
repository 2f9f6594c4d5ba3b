package tokenize

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

// Template is one format: the special tokens it writes (Markers), which
// the model's tokenizer must have as tokens, else they would reach the
// model as plain characters, and the token that ends a turn (EndOfTurn),
// which stops generation as the model's end token does.
type Template struct {
	Markers   []string
	EndOfTurn string
	apply     func(b *strings.Builder, msgs []infer.ChatMessage) error
}

// TemplateNames lists the templates in the order docs and errors give them.
func TemplateNames() []string {
	return []string{TemplatePlain, TemplateChatML, TemplateLlama3, TemplateLlama2, TemplateMistral, TemplateGemma, TemplatePhi3, TemplateZephyr}
}

// LookupTemplate returns the template called name.
func LookupTemplate(name string) (Template, bool) {
	switch name {
	case TemplatePlain:
		return Template{apply: func(b *strings.Builder, msgs []infer.ChatMessage) error {
			for _, m := range msgs {
				b.WriteString(m.Content)
				b.WriteByte('\n')
			}
			return nil
		}}, true
	case TemplateChatML:
		return Template{
			Markers:   []string{"<|im_start|>", "<|im_end|>"},
			EndOfTurn: "<|im_end|>",
			apply: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				for _, m := range msgs {
					fmt.Fprintf(b, "<|im_start|>%s\n%s<|im_end|>\n", m.Role, m.Content)
				}
				b.WriteString("<|im_start|>assistant\n")
				return nil
			},
		}, true
	case TemplateLlama3:
		return Template{
			Markers:   []string{"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"},
			EndOfTurn: "<|eot_id|>",
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
		return Template{
			Markers:   []string{"<s>", "</s>"},
			EndOfTurn: "</s>",
			apply: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				return applyInst(b, msgs, name == TemplateLlama2)
			},
		}, true
	case TemplateGemma:
		return Template{
			Markers:   []string{"<bos>", "<start_of_turn>", "<end_of_turn>"},
			EndOfTurn: "<end_of_turn>",
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
		return Template{
			Markers:   []string{"<|user|>", "<|assistant|>", "<|end|>"},
			EndOfTurn: "<|end|>",
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
		return Template{
			Markers:   []string{"</s>"},
			EndOfTurn: "</s>",
			apply: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				for _, m := range msgs {
					fmt.Fprintf(b, "<|%s|>\n%s</s>\n", m.Role, m.Content)
				}
				b.WriteString("<|assistant|>\n")
				return nil
			},
		}, true
	}
	return Template{}, false
}

// ConversationError is a conversation a template cannot express: the
// request's fault, not the model's.
type ConversationError struct{ Message string }

func (e *ConversationError) Error() string { return e.Message }

// Apply renders msgs with the template called name. A conversation the
// format cannot express is a *ConversationError.
func Apply(name string, msgs []infer.ChatMessage) (string, error) {
	t, ok := LookupTemplate(name)
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
			return &ConversationError{fmt.Sprintf(
				"messages[%d]: this model's chat format needs turns to alternate user and assistant after an optional first system message, got %q where %q belongs", i, m.Role, want)}
		}
	}
	if len(msgs)%2 == 0 {
		return &ConversationError{"this model's chat format needs the conversation to end with a user message"}
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
