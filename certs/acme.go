package certs

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// ACMEConfig configures certificates obtained from an ACME CA for public
// names. The fields with json tags are the configuration file's tls.acme
// section as it is written.
type ACMEConfig struct {
	// Hosts are the names to obtain certificates for; a handshake for any
	// other name is not sent to the CA. Public DNS names: autocert refuses
	// names without a dot and IP addresses. In a configuration file, none
	// turns ACME off.
	Hosts []string `json:"hosts"`
	// DirectoryURL is the CA's ACME directory. Empty: autocert's default
	// public CA.
	DirectoryURL string `json:"directory_url"`
	// Email is the account's contact, optional.
	Email string `json:"email"`
	// CacheDir keeps the account key and the certificates across restarts
	// (and lets instances on a shared volume share them). Required.
	CacheDir string `json:"cache_dir"`
	// CAFile is a PEM bundle of the roots that verify the directory's
	// HTTPS certificate, for a private ACME server; NewACME reads it into
	// RootCAs when RootCAs is nil. Empty: the system roots.
	CAFile string `json:"ca_file"`
	// RootCAs verifies the directory's HTTPS certificate. nil: CAFile's
	// roots, else the system roots.
	RootCAs *x509.CertPool `json:"-"`
	// Transport, when set, carries the requests to the CA instead of one
	// built from RootCAs.
	Transport http.RoundTripper `json:"-"`
}

// Validate reports every problem with c as the configuration file's
// tls.acme section at once, each naming its key. No hosts means ACME is
// off, and then the keys that only shape it are a mistake.
func (c ACMEConfig) Validate() error {
	var errs []error
	for i, h := range c.Hosts {
		if !strings.Contains(strings.Trim(h, "."), ".") || net.ParseIP(h) != nil {
			errs = append(errs, fmt.Errorf("tls.acme.hosts[%d]: want a public DNS name, got %q", i, h))
		}
	}
	if len(c.Hosts) == 0 && (c.DirectoryURL != "" || c.CAFile != "" || c.Email != "") {
		errs = append(errs, errors.New("tls.acme.hosts: must name at least one host when other tls.acme keys are set"))
	}
	return errors.Join(errs...)
}

// ACME obtains and renews certificates as handshakes ask for them. It
// answers the tls-alpn-01 challenge in the handshake itself, so the
// listener serving it must offer the ALPN protocol ACMEALPN.
type ACME struct {
	m     *autocert.Manager
	hosts []string
}

// ACMEALPN is the protocol a CA's validation handshake asks for (RFC 8737).
const ACMEALPN = acme.ALPNProto

// acmeTimeout bounds one request to the CA.
const acmeTimeout = 30 * time.Second

// NewACME builds the manager; nothing is asked of the CA until a handshake
// needs a certificate.
func NewACME(cfg ACMEConfig) (*ACME, error) {
	var errs []error
	if len(cfg.Hosts) == 0 {
		errs = append(errs, errors.New("tls.acme.hosts: at least one name is required"))
	} else {
		errs = append(errs, cfg.Validate())
	}
	if cfg.CacheDir == "" {
		errs = append(errs, errors.New("tls.acme.cache_dir: required"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if cfg.RootCAs == nil && cfg.CAFile != "" {
		pool, err := LoadPool(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("tls.acme.ca_file: %w", err)
		}
		cfg.RootCAs = pool
	}
	client := &acme.Client{DirectoryURL: cfg.DirectoryURL}
	switch {
	case cfg.Transport != nil:
		client.HTTPClient = &http.Client{Timeout: acmeTimeout, Transport: cfg.Transport}
	case cfg.RootCAs != nil:
		client.HTTPClient = &http.Client{
			Timeout:   acmeTimeout,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: cfg.RootCAs}},
		}
	}
	return &ACME{
		m: &autocert.Manager{
			Prompt:     autocert.AcceptTOS,
			HostPolicy: autocert.HostWhitelist(cfg.Hosts...),
			Cache:      autocert.DirCache(cfg.CacheDir),
			Client:     client,
			Email:      cfg.Email,
		},
		hosts: slices.Clone(cfg.Hosts),
	}, nil
}

// Handles reports whether a handshake is for the CA to answer: one of the
// hosts, or a validation handshake.
func (a *ACME) Handles(hello *tls.ClientHelloInfo) bool {
	return slices.Contains(hello.SupportedProtos, ACMEALPN) || slices.Contains(a.hosts, strings.TrimSuffix(strings.ToLower(hello.ServerName), "."))
}

// GetCertificate is tls.Config.GetCertificate for the hosts.
func (a *ACME) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	return a.m.GetCertificate(hello)
}

// CertificateSource picks the certificate for each handshake: ACME's for
// its hosts (when acme is set), otherwise fallback's.
func CertificateSource(acme *ACME, fallback func(*tls.ClientHelloInfo) (*tls.Certificate, error)) func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		if acme != nil && acme.Handles(hello) {
			return acme.GetCertificate(hello)
		}
		return fallback(hello)
	}
}
