package upstream

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// material is what an upstream's files and environment held when they
// were read: when the Set is built and again on every Update, so that a
// rotated CA, client certificate or credential takes effect on SIGHUP.
type material struct {
	roots      *x509.CertPool // nil: the system's roots
	certs      []tls.Certificate
	credential string // "" when none is configured
	// digest covers everything read, so that Update can tell an
	// upstream whose files changed under an unchanged config.
	digest [sha256.Size]byte
}

// load reads c's files (and environment variable), reporting every
// problem at once, each naming its key under key.
func load(c Config, key string, lookupEnv func(string) (string, bool)) (material, error) {
	var (
		m    material
		errs []error
		h    = sha256.New()
	)
	bad := func(field string, err error) { errs = append(errs, fmt.Errorf("%s.%s: %w", key, field, err)) }
	mix := func(label string, b []byte) {
		fmt.Fprintf(h, "%s:%d:", label, len(b))
		h.Write(b)
	}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		switch {
		case err != nil:
			bad("ca_file", err)
		default:
			m.roots = x509.NewCertPool()
			if !m.roots.AppendCertsFromPEM(pem) {
				bad("ca_file", fmt.Errorf("%s holds no PEM certificate", c.CAFile))
			}
			mix("ca", pem)
		}
	}
	if c.CertFile != "" && c.KeyFile != "" {
		certPEM, err1 := os.ReadFile(c.CertFile)
		keyPEM, err2 := os.ReadFile(c.KeyFile)
		switch {
		case err1 != nil:
			bad("cert_file", err1)
		case err2 != nil:
			bad("key_file", err2)
		default:
			cert, err := tls.X509KeyPair(certPEM, keyPEM)
			if err != nil {
				bad("cert_file", err)
			}
			m.certs = []tls.Certificate{cert}
			mix("cert", certPEM)
			mix("key", keyPEM)
		}
	}
	switch {
	case c.CredentialFile != "":
		tok, err := readCredential(c.CredentialFile)
		if err != nil {
			bad("credential_file", err)
		}
		m.credential = tok
	case c.CredentialEnv != "":
		v, ok := lookupEnv(c.CredentialEnv)
		v = strings.TrimSpace(v)
		switch {
		case !ok:
			bad("credential_env", fmt.Errorf("environment variable %s is not set", c.CredentialEnv))
		case v == "":
			bad("credential_env", fmt.Errorf("environment variable %s is empty", c.CredentialEnv))
		}
		m.credential = v
	}
	mix("credential", []byte(m.credential))
	copy(m.digest[:], h.Sum(nil))
	return m, errors.Join(errs...)
}

// readCredential reads a bearer token from a file that only its owner
// may read: a token others can read is as good as published.
func readCredential(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", err
	}
	if perm := st.Mode().Perm(); perm&0o044 != 0 {
		return "", fmt.Errorf("%s may be read by group or others (mode %04o): chmod 600 it", path, perm)
	}
	const limit = 16 << 10
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	if len(b) > limit {
		return "", fmt.Errorf("%s is larger than a credential (over %d bytes)", path, limit)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	if strings.ContainsAny(tok, "\r\n") {
		return "", fmt.Errorf("%s holds more than one line", path)
	}
	return tok, nil
}
