package qlogdir

import (
	"log/slog"
	"os"
	"path/filepath"
	"testing"
)

func TestRedact(t *testing.T) {
	for _, c := range []struct{ name, value, want string }{
		{"Authorization", "Bearer h3i_secret", Redacted},
		{"H3infer-Early-Proof", "proof", Redacted},
		{"H3infer-Binding", "binding", Redacted},
		{"Cookie", "session=1", Redacted},
		{"X-Anything", "a client's own header", Redacted},
		{"Priority", "u=3, i", "u=3, i"},
		{"Content-Type", "application/json", "application/json"},
		{":method", "POST", "POST"},
		{":status", "200", "200"},
		{":path", "/v1/chat/completions", "/v1/chat/completions"},
		{":path", "/v1/models?token=secret", "/v1/models?" + Redacted},
		{":authority", "edge.example:8443", Redacted},
	} {
		if got := redact(c.name, c.value); got != c.want {
			t.Errorf("redact(%q, %q) = %q, want %q", c.name, c.value, got, c.want)
		}
	}
}

func TestNewMakesAPrivateDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "traces")
	if _, err := New(dir, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("mode %v, want 0700", fi.Mode().Perm())
	}
	if _, err := New("", slog.New(slog.DiscardHandler)); err == nil {
		t.Error("New accepted an empty directory")
	}
}
