package main

import (
	"os"
	"testing"
)

// TestAdminToken: an admin listener off loopback gets a generated token,
// kept in a file only its owner reads and reused across restarts, instead
// of serve refusing to start; loopback and an operator's own token stay as
// they were.
func TestAdminToken(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{Admin: "0.0.0.0:9090", StateDir: dir}.withDefaults()
	if err := cfg.validate(); err != nil {
		t.Fatalf("a non-loopback admin address without admin_token is refused: %v", err)
	}
	tok, file, err := adminToken(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if file != adminTokenFile(dir) || len(tok) < 40 {
		t.Fatalf("generated token %d bytes in %q, want >= 40 bytes in %q", len(tok), file, adminTokenFile(dir))
	}
	fi, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("%s has mode %04o, want 0600", file, fi.Mode().Perm())
	}
	if again, _, err := adminToken(cfg); err != nil || again != tok {
		t.Errorf("second start: token changed (%v)", err)
	}
	if other, _, _ := adminToken(Config{Admin: "0.0.0.0:9090", StateDir: t.TempDir()}); other == tok {
		t.Error("two state dirs generated the same token")
	}

	os.Chmod(file, 0o644)
	if _, _, err := adminToken(cfg); err == nil {
		t.Error("a token file others can read was used")
	}

	for name, c := range map[string]struct {
		cfg  Config
		want string
	}{
		"loopback":            {Config{Admin: "127.0.0.1:9090", StateDir: t.TempDir()}, ""},
		"localhost":           {Config{Admin: "localhost:0", StateDir: t.TempDir()}, ""},
		"operator's own":      {Config{Admin: "0.0.0.0:9090", AdminToken: "mine", StateDir: t.TempDir()}, "mine"},
		"operator's loopback": {Config{Admin: "[::1]:9090", AdminToken: "mine", StateDir: t.TempDir()}, "mine"},
	} {
		tok, file, err := adminToken(c.cfg)
		if err != nil || tok != c.want || file != "" {
			t.Errorf("%s: token %q file %q err %v, want %q and no file", name, tok, file, err, c.want)
		}
		if _, err := os.Stat(adminTokenFile(c.cfg.StateDir)); err == nil {
			t.Errorf("%s: a token file was written", name)
		}
	}
}
