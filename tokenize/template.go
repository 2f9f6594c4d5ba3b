package tokenize

import (
	"fmt"
	"slices"
	"strings"

	"h3infer/infer"
)

// Named chat templates turn a conversation into the prompt text the model
// continues. Each is written in Go after the format its model family was
// trained on; model.json's chat_template picks one by name, and they serve
// models whose files bring no Jinja template of their own (jinja.go).
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

// ChatTemplate formats a conversation as the prompt text a model
// continues. It is one of the named templates above, written in Go, or a
// model's own Jinja template (LoadJinja); the engine uses both through
// Render alone. It is safe for concurrent use.
type ChatTemplate struct {
	// Name is a named template's name; empty for a Jinja template.
	Name string
	// File is the file a Jinja template was read from; empty for a named
	// one.
	File string
	// Markers are the special tokens the template writes, which the
	// model's tokenizer must have as added tokens, else they would reach
	// the model as plain characters. A Jinja template's are its bos_token
	// and eos_token, the only ones its files name.
	Markers []string
	// EndOfTurn is the token that ends a turn, which stops generation as
	// the model's end token does: a Jinja template's eos_token.
	EndOfTurn string

	named namedTemplate  // a named template's format
	jinja *jinjaTemplate // a Jinja template; nil for a named one

	// ToolFormat is the family of tool call syntax the model writes
	// (package toolcall), set by whoever loads the template for a model
	// (workerconf.ModelConfig.LoadChatTemplate); "" when none is known.
	ToolFormat string
}

// Render formats msgs as a prompt; addGenerationPrompt ends it with
// what opens the assistant's answer, as a chat request wants. A
// conversation the template refuses is a *ConversationError.
func (t *ChatTemplate) Render(msgs []infer.ChatMessage, addGenerationPrompt bool) (string, error) {
	if t.jinja != nil {
		return t.jinja.render(msgs, addGenerationPrompt)
	}
	var b strings.Builder
	if err := t.named.body(&b, msgs); err != nil {
		return "", err
	}
	if addGenerationPrompt {
		b.WriteString(t.named.opening)
	}
	return b.String(), nil
}

// String names the template in logs and errors.
func (t *ChatTemplate) String() string {
	if t.File != "" {
		return "jinja " + t.File
	}
	return t.Name
}

// TemplateNames lists the templates in the order docs and errors give them.
func TemplateNames() []string {
	return []string{TemplatePlain, TemplateChatML, TemplateLlama3, TemplateLlama2, TemplateMistral, TemplateGemma, TemplatePhi3, TemplateZephyr}
}

// namedTemplate is a named template: its markers, end of turn, the body
// it writes per conversation and the assistant's opening (empty where
// the format has none apart from the body).
type namedTemplate struct {
	markers   []string
	endOfTurn string
	body      func(b *strings.Builder, msgs []infer.ChatMessage) error
	opening   string
}

// LookupTemplate returns the named template called name.
func LookupTemplate(name string) (*ChatTemplate, bool) {
	n, ok := lookupNamed(name)
	if !ok {
		return nil, false
	}
	return &ChatTemplate{Name: name, Markers: n.markers, EndOfTurn: n.endOfTurn, named: n}, true
}

func lookupNamed(name string) (namedTemplate, bool) {
	switch name {
	case TemplatePlain:
		return namedTemplate{body: func(b *strings.Builder, msgs []infer.ChatMessage) error {
			for _, m := range msgs {
				b.WriteString(m.Content)
				b.WriteByte('\n')
			}
			return nil
		}}, true
	case TemplateChatML:
		return namedTemplate{
			markers:   []string{"<|im_start|>", "<|im_end|>"},
			endOfTurn: "<|im_end|>",
			body: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				for _, m := range msgs {
					fmt.Fprintf(b, "<|im_start|>%s\n%s<|im_end|>\n", m.Role, m.Content)
				}
				return nil
			},
			opening: "<|im_start|>assistant\n",
		}, true
	case TemplateLlama3:
		return namedTemplate{
			markers:   []string{"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"},
			endOfTurn: "<|eot_id|>",
			body: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				b.WriteString("<|begin_of_text|>")
				for _, m := range msgs {
					fmt.Fprintf(b, "<|start_header_id|>%s<|end_header_id|>\n\n%s<|eot_id|>", m.Role, strings.TrimSpace(m.Content))
				}
				return nil
			},
			opening: "<|start_header_id|>assistant<|end_header_id|>\n\n",
		}, true
	case TemplateLlama2, TemplateMistral:
		// The last user message's [/INST] opens the answer.
		return namedTemplate{
			markers:   []string{"<s>", "</s>"},
			endOfTurn: "</s>",
			body: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				return applyInst(b, msgs, name == TemplateLlama2)
			},
		}, true
	case TemplateGemma:
		return namedTemplate{
			markers:   []string{"<bos>", "<start_of_turn>", "<end_of_turn>"},
			endOfTurn: "<end_of_turn>",
			body: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				b.WriteString("<bos>")
				for _, m := range foldSystem(msgs) {
					role := m.Role
					if role == "assistant" {
						role = "model"
					}
					fmt.Fprintf(b, "<start_of_turn>%s\n%s<end_of_turn>\n", role, strings.TrimSpace(m.Content))
				}
				return nil
			},
			opening: "<start_of_turn>model\n",
		}, true
	case TemplatePhi3:
		return namedTemplate{
			markers:   []string{"<|user|>", "<|assistant|>", "<|end|>"},
			endOfTurn: "<|end|>",
			body: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				for _, m := range msgs {
					fmt.Fprintf(b, "<|%s|>\n%s<|end|>\n", m.Role, m.Content)
				}
				return nil
			},
			opening: "<|assistant|>\n",
		}, true
	case TemplateZephyr:
		// Zephyr's role tags are ordinary text to its tokenizer; only the
		// end-of-sequence token is special.
		return namedTemplate{
			markers:   []string{"</s>"},
			endOfTurn: "</s>",
			body: func(b *strings.Builder, msgs []infer.ChatMessage) error {
				for _, m := range msgs {
					fmt.Fprintf(b, "<|%s|>\n%s</s>\n", m.Role, m.Content)
				}
				return nil
			},
			opening: "<|assistant|>\n",
		}, true
	}
	return namedTemplate{}, false
}

// ConversationError is a conversation a template cannot express: the
// request's fault, not the model's. A Jinja template's raise_exception
// is one, with the template's message.
type ConversationError struct{ Message string }

func (e *ConversationError) Error() string { return e.Message }

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
