package backend

import (
	"fmt"
	"strings"

	"h3infer/transport"
)

// Chat templates turn a conversation into the prompt text the model
// continues.
const (
	// TemplatePlain writes each message's content followed by "\n",
	// ignoring roles; the model then continues as the assistant. It suits
	// the demo model, which was never trained on any chat format.
	TemplatePlain = "plain"
	// TemplateChatML writes "<|im_start|>ROLE\nCONTENT<|im_end|>\n" per
	// message and ends with "<|im_start|>assistant\n".
	TemplateChatML = "chatml"
)

func validTemplate(name string) bool {
	return name == TemplatePlain || name == TemplateChatML
}

func applyTemplate(name string, msgs []transport.ChatMessage) (string, error) {
	var b strings.Builder
	switch name {
	case TemplatePlain:
		for _, m := range msgs {
			b.WriteString(m.Content)
			b.WriteByte('\n')
		}
	case TemplateChatML:
		for _, m := range msgs {
			fmt.Fprintf(&b, "<|im_start|>%s\n%s<|im_end|>\n", m.Role, m.Content)
		}
		b.WriteString("<|im_start|>assistant\n")
	default:
		return "", fmt.Errorf("unknown chat template %q", name)
	}
	return b.String(), nil
}
