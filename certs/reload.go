package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// Reloader serves a certificate and key read from files and reads them again
// when they change or when asked. A connection's certificate is chosen in its
// own handshake (GetCertificate), so swapping it never touches connections
// already open; a pair that fails to load leaves the old one in service.
type Reloader struct {
	log *slog.Logger

	mu       sync.Mutex
	certFile string
	keyFile  string
	stamp    fileStamp
	current  *tls.Certificate
}

// fileStamp is what the watcher compares to notice a replaced file.
type fileStamp struct {
	certMod, keyMod   time.Time
	certSize, keySize int64
}

// NewReloader loads the pair; it fails when the first load fails.
func NewReloader(certFile, keyFile string, log *slog.Logger) (*Reloader, error) {
	if log == nil {
		return nil, errors.New("certs: reloader: logger is nil")
	}
	r := &Reloader{log: log}
	if err := r.SetFiles(certFile, keyFile); err != nil {
		return nil, err
	}
	return r, nil
}

// GetCertificate is tls.Config.GetCertificate.
func (r *Reloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.current, nil
}

// Files reports the paths in use.
func (r *Reloader) Files() (certFile, keyFile string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.certFile, r.keyFile
}

// SetFiles switches to another pair of files (a reloaded configuration may
// name new paths). Nothing changes when the new pair does not load.
func (r *Reloader) SetFiles(certFile, keyFile string) error {
	kp, stamp, err := loadStamped(certFile, keyFile)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.certFile, r.keyFile, r.stamp, r.current = certFile, keyFile, stamp, kp
	r.mu.Unlock()
	r.log.Info("certificate loaded", "cert_file", certFile, "not_after", kp.Leaf.NotAfter, "spki", SPKIPin(kp.Leaf))
	return nil
}

// Reload reads the current files again, whether or not they changed.
func (r *Reloader) Reload() error {
	certFile, keyFile := r.Files()
	return r.SetFiles(certFile, keyFile)
}

// Watch checks the files every interval until ctx ends and reloads the pair
// when either changed. A pair caught half-written fails to load (the key
// does not match the certificate) and is tried again at the next check, so
// an operator may replace the two files in either order.
func (r *Reloader) Watch(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.mu.Lock()
		certFile, keyFile, old := r.certFile, r.keyFile, r.stamp
		r.mu.Unlock()
		now, err := stampOf(certFile, keyFile)
		if err != nil || now == old {
			continue
		}
		if err := r.SetFiles(certFile, keyFile); err != nil {
			r.log.Warn("certificate files changed but do not load; keeping the old pair", "cert_file", certFile, "err", err)
			// Remember the stamp so that a broken pair is reported once,
			// not every tick; the next change is tried again.
			r.mu.Lock()
			if r.certFile == certFile {
				r.stamp = now
			}
			r.mu.Unlock()
		}
	}
}

func loadStamped(certFile, keyFile string) (*tls.Certificate, fileStamp, error) {
	stamp, err := stampOf(certFile, keyFile)
	if err != nil {
		return nil, stamp, fmt.Errorf("certs: %w", err)
	}
	kp, err := LoadKeyPair(certFile, keyFile)
	if err != nil {
		return nil, stamp, err
	}
	if kp.Leaf == nil {
		if kp.Leaf, err = x509.ParseCertificate(kp.Certificate[0]); err != nil {
			return nil, stamp, fmt.Errorf("certs: parse %s: %w", certFile, err)
		}
	}
	return &kp, stamp, nil
}

func stampOf(certFile, keyFile string) (fileStamp, error) {
	c, err := os.Stat(certFile)
	if err != nil {
		return fileStamp{}, err
	}
	k, err := os.Stat(keyFile)
	if err != nil {
		return fileStamp{}, err
	}
	return fileStamp{certMod: c.ModTime(), keyMod: k.ModTime(), certSize: c.Size(), keySize: k.Size()}, nil
}
