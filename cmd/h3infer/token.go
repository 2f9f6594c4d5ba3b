package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"h3infer/tlsbind"
)

// devTokenFile is where serve keeps a development credential that chat
// finds by itself.
func devTokenFile(stateDir string) string { return filepath.Join(stateDir, "tokens", "dev.token") }

func keysFile(stateDir string) string { return filepath.Join(stateDir, "tokens", "keys.json") }

func runToken(args []string, stdout io.Writer) error {
	if len(args) == 0 || (args[0] != "issue" && args[0] != "rotate") {
		return usagef("usage: h3infer token issue|rotate [flags]")
	}
	if args[0] == "rotate" {
		return runTokenRotate(args[1:], stdout)
	}
	fs := flag.NewFlagSet("token issue", flag.ContinueOnError)
	stateDir := fs.String("state-dir", ".h3infer", "state directory; signing keys live in DIR/tokens/keys.json")
	tenant := fs.String("tenant", "", "tenant the token names (required)")
	models := fs.String("models", "", "comma-separated models the token may use (default: all)")
	ttl := fs.Duration("ttl", 24*time.Hour, "lifetime")
	bind := fs.String("bind", "optional", "optional (browsers) or required (native clients that bind to the connection)")
	ceiling := fs.Int("urgency-ceiling", -1, "most urgent RFC 9218 urgency the holder may ask for, 0..7 (-1: no limit)")
	audience := fs.String("audience", tlsbind.DefaultAudience, "audience the gateway expects")
	if err := parseFlags(fs, args[1:], 0); err != nil {
		return err
	}
	var errs []error
	if *tenant == "" {
		errs = append(errs, errors.New("--tenant is required"))
	}
	if *ttl <= 0 {
		errs = append(errs, fmt.Errorf("--ttl must be positive, got %s", *ttl))
	}
	if *ceiling < -1 || *ceiling > 7 {
		errs = append(errs, fmt.Errorf("--urgency-ceiling must be 0..7 or -1, got %d", *ceiling))
	}
	if *bind != string(tlsbind.BindOptional) && *bind != string(tlsbind.BindRequired) {
		errs = append(errs, fmt.Errorf("--bind must be optional or required, got %q", *bind))
	}
	if err := errors.Join(errs...); err != nil {
		return usageError{err}
	}
	ring, err := tlsbind.EnsureKeyRing(keysFile(*stateDir), time.Now())
	if err != nil {
		return err
	}
	c := tokenClaims(*tenant, *audience, *ttl, tlsbind.Bind(*bind))
	if *models != "" {
		c.Models = strings.Split(*models, ",")
	}
	if *ceiling >= 0 {
		u := uint8(*ceiling)
		c.UrgencyCeiling = &u
	}
	cred, err := ring.Issue(c)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, cred)
	return nil
}

func tokenClaims(tenant, audience string, ttl time.Duration, bind tlsbind.Bind) tlsbind.Claims {
	now := time.Now()
	return tlsbind.Claims{
		Tenant: tenant, Audience: audience, Bind: bind,
		// A minute of slack for clocks that disagree.
		IssuedAt: now.Unix(), NotBefore: now.Add(-time.Minute).Unix(), Expires: now.Add(ttl).Unix(),
	}
}

func runTokenRotate(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("token rotate", flag.ContinueOnError)
	stateDir := fs.String("state-dir", ".h3infer", "state directory")
	keep := fs.Duration("keep", 30*24*time.Hour, "how long the old key keeps verifying (the longest token lifetime)")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	ring, err := tlsbind.EnsureKeyRing(keysFile(*stateDir), time.Now())
	if err != nil {
		return err
	}
	if err := ring.Rotate(time.Now(), *keep); err != nil {
		return err
	}
	if err := ring.Save(keysFile(*stateDir)); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "signing key %s; restart serve to load it\n", ring.Keys[0].ID)
	return nil
}

// ensureDevToken returns the development credential under the state dir,
// issuing a fresh one when it is missing, unreadable or expiring within a
// day.
func ensureDevToken(stateDir string, ring *tlsbind.KeyRing, v *tlsbind.Verifier) (string, error) {
	path := devTokenFile(stateDir)
	if b, err := os.ReadFile(path); err == nil {
		if bearer, _, err := tlsbind.SplitCredential(string(b)); err == nil {
			if t, err := v.Verify(bearer); err == nil && time.Until(time.Unix(t.Expires, 0)) > 24*time.Hour {
				return strings.TrimSpace(string(b)), nil
			}
		}
	}
	cred, err := ring.Issue(tokenClaims("dev", tlsbind.DefaultAudience, 30*24*time.Hour, tlsbind.BindOptional))
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("dev token: %w", err)
	}
	if err := os.WriteFile(path, []byte(cred+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("dev token: %w", err)
	}
	return cred, nil
}
