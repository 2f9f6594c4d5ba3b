package tokenizers

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"h3infer/infer"
	"h3infer/workerconf"
)

// versionDir writes a version directory as the repository holds one:
// model.json naming template, and testdata's tokenizer.json (a byte-level
// BPE with the ChatML markers as added tokens).
func versionDir(t *testing.T, template string) string {
	t.Helper()
	dir := t.TempDir()
	tok, err := os.ReadFile(filepath.Join("testdata", "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`{"name":"m","context_length":128,"eos_token":"<|endoftext|>","chat_template":%q}`, template)
	for name, data := range map[string][]byte{workerconf.ModelConfigFile: []byte(cfg), workerconf.TokenizerFile: tok} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestModelEncodesAsTheWorker(t *testing.T) {
	c, err := New(0)
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.Get(t.Context(), versionDir(t, "chatml"))
	if err != nil {
		t.Fatal(err)
	}
	if m.ContextLength() != 128 || m.VocabSize() != 270 {
		t.Errorf("context %d, vocab %d; want 128, 270", m.ContextLength(), m.VocabSize())
	}
	ids, err := m.EncodeChat([]infer.ChatMessage{{Role: "user", Content: "the cat"}}, true, false)
	if err != nil {
		t.Fatal(err)
	}
	// <|im_start|> and <|im_end|> are one token each, 268 and 269.
	if ids[0] != 268 || !slices.Contains(ids, 269) || m.Decode(ids) != "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n" {
		t.Errorf("chat ids %v decode to %q", ids, m.Decode(ids))
	}
	strs := m.TokenStrings(m.EncodePrompt(" the<|im_end|>", true))
	if want := []string{"Ġthe", "<|im_end|>"}; !slices.Equal(strs, want) {
		t.Errorf("token strings %q, want %q", strs, want)
	}
	ids, err = m.EncodeChat([]infer.ChatMessage{{Role: "user", Content: "x"}}, false, false)
	if err != nil || m.Decode(ids) != "<|im_start|>user\nx<|im_end|>\n" {
		t.Errorf("add_generation_prompt false: %q, %v; want the conversation without the assistant's opening", m.Decode(ids), err)
	}
	// A byte that is not UTF-8 on its own becomes U+FFFD: 0xC3 is the
	// first byte of "é", whose second byte is another token.
	if id := m.EncodePrompt("é", false)[0]; m.Decode([]int{id}) != "\uFFFD" {
		t.Errorf("half a character decodes to %q", m.Decode([]int{id}))
	}
}

func TestCacheSharesOneLoadAndStaysBounded(t *testing.T) {
	c, err := New(2)
	if err != nil {
		t.Fatal(err)
	}
	dirs := []string{versionDir(t, "chatml"), versionDir(t, "plain"), versionDir(t, "chatml")}
	var wg sync.WaitGroup
	got := make([]*Model, 16)
	for i := range got {
		wg.Go(func() {
			m, err := c.Get(t.Context(), dirs[0])
			if err != nil {
				t.Error(err)
			}
			got[i] = m
		})
	}
	wg.Wait()
	for _, m := range got {
		if m != got[0] {
			t.Fatal("concurrent Gets of one directory returned different Models: it was read more than once")
		}
	}
	for _, d := range dirs[1:] {
		if _, err := c.Get(t.Context(), d); err != nil {
			t.Fatal(err)
		}
	}
	if c.Len() != 2 {
		t.Errorf("holds %d directories, want the bound of 2", c.Len())
	}
	// dirs[0] was the least recently used: it is read again.
	if m, err := c.Get(t.Context(), dirs[0]); err != nil || m == got[0] {
		t.Errorf("the evicted directory came back as the same Model (%v)", err)
	}
}

func TestCacheRefusals(t *testing.T) {
	c, err := New(0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(t.Context(), "synthetic:2ms"); !errors.Is(err, ErrSynthetic) {
		t.Errorf("synthetic: %v, want ErrSynthetic", err)
	}
	missing := filepath.Join(t.TempDir(), "gone")
	if _, err := c.Get(t.Context(), missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing directory: %v, want an error naming it", err)
	}
	if c.Len() != 0 {
		t.Errorf("a failed read was kept")
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	// A cancelled caller still reads a directory nobody is reading: the
	// read is its own work, not a wait.
	if _, err := c.Get(ctx, versionDir(t, "plain")); err != nil {
		t.Errorf("Get with a cancelled context and no read to wait for: %v", err)
	}
	if _, err := New(-1); err == nil {
		t.Error("New(-1) succeeded")
	}
}
