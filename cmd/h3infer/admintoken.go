package main

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
)

// adminTokenFile is where serve keeps the admin token it generated, and
// where `h3infer models` looks for it.
func adminTokenFile(stateDir string) string {
	return filepath.Join(stateDir, "tokens", "admin.token")
}

// adminToken returns the token the admin listener demands: admin_token
// when configured; none on a loopback admin address; otherwise the one in
// adminTokenFile, generated there (mode 0600) on first use. file is the
// path the token came from, "" when it came from the config or there is
// none.
func adminToken(cfg Config) (token, file string, err error) {
	host, _, _ := net.SplitHostPort(cfg.Admin)
	if cfg.AdminToken != "" || isLoopbackHost(host) {
		return cfg.AdminToken, "", nil
	}
	path := adminTokenFile(cfg.StateDir)
	if fi, err := os.Stat(path); err == nil {
		// A token others can read is no secret; say so rather than use it.
		if fi.Mode().Perm()&0o077 != 0 {
			return "", "", fmt.Errorf("admin token %s: mode %04o lets others read it; chmod 600 it or remove it", path, fi.Mode().Perm())
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return "", "", fmt.Errorf("admin token: %w", err)
		}
		if t := strings.TrimSpace(string(b)); t != "" {
			return t, path, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", "", fmt.Errorf("admin token: %w", err)
	}
	key := make([]byte, 32)
	rand.Read(key) // never fails (crypto/rand since Go 1.24)
	t := base64.RawURLEncoding.EncodeToString(key)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", "", fmt.Errorf("admin token: %w", err)
	}
	if err := os.WriteFile(path, []byte(t+"\n"), 0o600); err != nil {
		return "", "", fmt.Errorf("admin token: %w", err)
	}
	return t, path, nil
}
