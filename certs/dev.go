// Package certs issues and loads the certificates h3infer serves with: a
// development CA and leaf for local use, and key pairs loaded from files.
// Later it also owns reloading, session-ticket key rotation and ACME.
//
// It must not import gateway.
package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// DefaultNames are the names a development leaf is valid for.
var DefaultNames = []string{"localhost", "127.0.0.1", "::1"}

// File names inside a development certificate directory.
const (
	CAFile     = "ca.pem"
	CAKeyFile  = "ca-key.pem"
	CertFile   = "cert.pem"
	KeyFile    = "key.pem"
	SPKIFile   = "spki.txt"
	caValidity = 10 * 365 * 24 * time.Hour
	// Leaves stay under the 398 days browsers accept for server certificates.
	leafValidity = 397 * 24 * time.Hour
)

// Dev describes a development CA and leaf on disk.
type Dev struct {
	Dir      string
	CAFile   string
	CertFile string
	KeyFile  string
	// SPKI is the base64 SHA-256 of the leaf's SubjectPublicKeyInfo, the
	// form Chromium's --ignore-certificate-errors-spki-list takes.
	SPKI string
	// Created reports whether this call wrote new files.
	Created bool
}

// DevOptions controls EnsureDev.
type DevOptions struct {
	// Names the leaf is valid for, DNS names or IP addresses; DefaultNames
	// are always included.
	Names []string
	// Force replaces an existing CA and leaf.
	Force bool
	// Now is the issuing time; zero means time.Now.
	Now time.Time
}

// EnsureDev makes sure dir holds a development CA and a leaf signed by it,
// creating what is missing and reusing what exists. A leaf that lacks one of
// the requested names, or is expired, is issued again from the existing CA.
func EnsureDev(dir string, opts DevOptions) (*Dev, error) {
	names := slices.Clone(DefaultNames)
	for _, n := range opts.Names {
		if !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	now := opts.Now
	if now.IsZero() {
		now = time.Now()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("certs: %w", err)
	}
	d := &Dev{
		Dir:      dir,
		CAFile:   filepath.Join(dir, CAFile),
		CertFile: filepath.Join(dir, CertFile),
		KeyFile:  filepath.Join(dir, KeyFile),
	}

	caCert, caKey, err := loadCA(dir)
	switch {
	case err == nil && !opts.Force && now.Before(caCert.NotAfter):
	case err == nil || errors.Is(err, fs.ErrNotExist):
		caCert, caKey, err = newCA(now)
		if err != nil {
			return nil, err
		}
		if err := writePEM(d.CAFile, "CERTIFICATE", caCert.Raw, 0o644); err != nil {
			return nil, err
		}
		if err := writeKey(filepath.Join(dir, CAKeyFile), caKey); err != nil {
			return nil, err
		}
		d.Created = true
	default:
		return nil, err
	}

	leaf, err := loadLeaf(d.CertFile, d.KeyFile)
	if d.Created || opts.Force || err != nil || !leafFits(leaf, caCert, names, now) {
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		der, key, err := newLeaf(caCert, caKey, names, now)
		if err != nil {
			return nil, err
		}
		if err := writeKey(d.KeyFile, key); err != nil {
			return nil, err
		}
		if err := writePEM(d.CertFile, "CERTIFICATE", der, 0o644); err != nil {
			return nil, err
		}
		if leaf, err = x509.ParseCertificate(der); err != nil {
			return nil, fmt.Errorf("certs: parse new leaf: %w", err)
		}
		d.Created = true
	}
	d.SPKI = SPKIPin(leaf)
	if err := os.WriteFile(filepath.Join(dir, SPKIFile), []byte(d.SPKI+"\n"), 0o644); err != nil {
		return nil, fmt.Errorf("certs: %w", err)
	}
	return d, nil
}

// SPKIPin returns the base64 SHA-256 of a certificate's SubjectPublicKeyInfo.
func SPKIPin(c *x509.Certificate) string {
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return base64.StdEncoding.EncodeToString(sum[:])
}

// LoadKeyPair loads a PEM certificate chain and key for serving.
func LoadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	kp, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("certs: load key pair %s: %w", certFile, err)
	}
	return kp, nil
}

// LoadPool reads a PEM file of CA certificates into a pool for clients.
func LoadPool(caFile string) (*x509.CertPool, error) {
	b, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("certs: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("certs: %s holds no PEM certificate", caFile)
	}
	return pool, nil
}

func leafFits(leaf, ca *x509.Certificate, names []string, now time.Time) bool {
	if now.After(leaf.NotAfter) || leaf.CheckSignatureFrom(ca) != nil {
		return false
	}
	for _, n := range names {
		if leaf.VerifyHostname(n) != nil {
			return false
		}
	}
	return true
}

func newCA(now time.Time) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("certs: CA key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "h3infer development CA", Organization: []string{"h3infer"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("certs: create CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("certs: parse CA: %w", err)
	}
	return cert, key, nil
}

func newLeaf(ca *x509.Certificate, caKey *ecdsa.PrivateKey, names []string, now time.Time) ([]byte, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("certs: leaf key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: names[0], Organization: []string{"h3infer development"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(leafValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("certs: create leaf: %w", err)
	}
	return der, key, nil
}

func loadCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cert, err := readCert(filepath.Join(dir, CAFile))
	if err != nil {
		return nil, nil, err
	}
	key, err := readKey(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

func loadLeaf(certFile, keyFile string) (*x509.Certificate, error) {
	if _, err := LoadKeyPair(certFile, keyFile); err != nil {
		if _, statErr := os.Stat(certFile); errors.Is(statErr, fs.ErrNotExist) {
			return nil, statErr
		}
		if _, statErr := os.Stat(keyFile); errors.Is(statErr, fs.ErrNotExist) {
			return nil, statErr
		}
		return nil, err
	}
	return readCert(certFile)
}

func readCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("certs: %s: no PEM certificate", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("certs: %s: %w", path, err)
	}
	return c, nil
}

func readKey(path string) (*ecdsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("certs: %s: no PEM key", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("certs: %s: %w", path, err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("certs: %s: want an ECDSA key, got %T", path, k)
	}
	return ek, nil
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("certs: marshal key: %w", err)
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

// writePEM writes through a temporary file so a crash never leaves half a
// certificate where the next start would read it.
func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err != nil {
		return fmt.Errorf("certs: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("certs: %w", err)
	}
	if err := pem.Encode(tmp, &pem.Block{Type: typ, Bytes: der}); err != nil {
		tmp.Close()
		return fmt.Errorf("certs: write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("certs: write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("certs: %w", err)
	}
	return nil
}

func randomSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("certs: serial: %w", err)
	}
	return n, nil
}
