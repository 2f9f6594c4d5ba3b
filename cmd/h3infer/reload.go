package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"reflect"
	"strings"
	"time"

	"h3infer/certs"
	"h3infer/certs/keysredis"
	"h3infer/gateway"
	"h3infer/scheduler"
	"h3infer/upstream"
	"h3infer/workerpool"
)

// certSource is where serve's certificates come from: a key pair from files
// (the configured one or the development leaf), reloaded when the files
// change and on SIGHUP, and ACME for public names when configured.
type certSource struct {
	reloader *certs.Reloader
	acme     *certs.ACME
	dev      *certs.Dev // nil when the configured files are served
	get      func(*tls.ClientHelloInfo) (*tls.Certificate, error)
}

func newCertSource(cfg Config, log *slog.Logger) (*certSource, error) {
	certFile, keyFile, dev, err := certFiles(cfg)
	if err != nil {
		return nil, err
	}
	r, err := certs.NewReloader(certFile, keyFile, log)
	if err != nil {
		return nil, err
	}
	src := &certSource{reloader: r, dev: dev}
	if a := cfg.TLS.ACME; len(a.Hosts) > 0 {
		if src.acme, err = certs.NewACME(a); err != nil {
			return nil, err
		}
		log.Info("acme enabled", "hosts", strings.Join(a.Hosts, ","), "directory", a.DirectoryURL)
	}
	src.get = certs.CertificateSource(src.acme, r.GetCertificate)
	return src, nil
}

func (s *certSource) getCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	return s.get(hello)
}

// tcpProtos are the extra ALPN protocols the TCP listener must offer.
func (s *certSource) tcpProtos() []string {
	if s.acme == nil {
		return nil
	}
	return []string{certs.ACMEALPN}
}

// certFiles names the pair to serve: the configured files, or the
// development leaf, created when missing.
func certFiles(cfg Config) (certFile, keyFile string, dev *certs.Dev, err error) {
	if cfg.TLS.CertFile != "" {
		return cfg.TLS.CertFile, cfg.TLS.KeyFile, nil, nil
	}
	dev, err = certs.EnsureDev(filepath.Join(cfg.StateDir, "certs"), certs.DevOptions{})
	if err != nil {
		return "", "", nil, err
	}
	return dev.CertFile, dev.KeyFile, dev, nil
}

// sessionKeyStore opens the store the instances share session keys
// through, and returns what closes it.
func sessionKeyStore(cfg Config) (certs.KeyStore, func(), error) {
	if cfg.ZeroRTT.SessionKeysStore != "redis" {
		return certs.FileStore{Path: cfg.ZeroRTT.SessionKeysFile}, func() {}, nil
	}
	seal, err := keysredis.EnsureSealKey(cfg.ZeroRTT.SessionKeysSealFile)
	if err != nil {
		return nil, nil, fmt.Errorf("zero_rtt.session_keys_seal_file: %w", err)
	}
	rc, err := openRedis(cfg, "zero_rtt")
	if err != nil {
		return nil, nil, err
	}
	st, err := keysredis.New(rc, "", seal)
	if err != nil {
		rc.Close()
		return nil, nil, err
	}
	return sealedKeyStore{st, cfg.ZeroRTT.SessionKeysSealFile}, func() { rc.Close() }, nil
}

// sealedKeyStore names the config key to look at when the keys in Redis
// cannot be opened: at start-up that stops the instance, later the
// rotator logs it and keeps the keys in use.
type sealedKeyStore struct {
	*keysredis.Store
	sealFile string
}

func (s sealedKeyStore) Current(ctx context.Context, now time.Time, every time.Duration) (*certs.SessionKeys, error) {
	k, err := s.Store.Current(ctx, now, every)
	if errors.Is(err, keysredis.ErrUnsealed) {
		err = fmt.Errorf("zero_rtt.session_keys_seal_file %s: %w; every instance sharing this Redis needs a copy of the same seal key file (to start over with fresh session keys instead, delete the Redis key %s)",
			s.sealFile, err, keysredis.DefaultKey)
	}
	return k, err
}

// tenantSetter is the part of the scheduler a reload changes.
type tenantSetter interface {
	SetTenants([]scheduler.Tenant) error
}

// limitSetter is the part of the gateway a reload changes.
type limitSetter interface {
	SetRateLimits(gateway.RateLimits) error
}

// policySetter is the part of the model registry a reload changes.
type policySetter interface {
	SetPolicy(workerpool.Policy) error
}

// upstreamSetter is the part of the upstream set a reload changes.
type upstreamSetter interface {
	Update([]upstream.Config) error
}

// reloadTargets are what a reload applies a new configuration to.
type reloadTargets struct {
	sched     tenantSetter
	limits    limitSetter
	models    policySetter
	certs     *certSource
	upstreams upstreamSetter
}

// registryPolicy is the model_repository settings a reload can change.
func registryPolicy(cfg Config) workerpool.Policy {
	return workerpool.Policy{
		Poll:         time.Duration(cfg.ModelRepository.Poll),
		AutoPromote:  *cfg.ModelRepository.AutoPromote,
		DrainTimeout: time.Duration(cfg.ModelRepository.DrainTimeout),
	}
}

// reloadConfig reads the configuration again (SIGHUP) and applies what can
// change while serving: the tenants, the rate limits (not their store), the
// model repository's poll, auto_promote and drain_timeout, the certificate
// files (read again even when their names did not change), the upstreams
// and the shutdown grace. A new configuration that does not validate (rate limits included),
// or whose certificate does not load, is refused as a whole and the running
// one stays. Other changes are reported as needing a restart and not
// applied. It returns the configuration now in force.
func reloadConfig(old Config, load func() (Config, error), to reloadTargets, log *slog.Logger) Config {
	refuse := func(err error) Config {
		log.Error("config reload refused; the running configuration stays", "err", err)
		return old
	}
	next, err := load()
	if err != nil {
		return refuse(err)
	}
	certFile, keyFile, _, err := certFiles(next)
	if err != nil {
		return refuse(err)
	}
	// Loading the pair is the one step that can fail on a configuration
	// that validated, so it goes first; a failure leaves everything as it
	// was.
	if err := to.certs.reloader.SetFiles(certFile, keyFile); err != nil {
		return refuse(err)
	}
	// validate checked the same rules as the setters below, so their
	// errors would be bugs; they are still logged rather than ignored.
	if err := to.sched.SetTenants(next.Scheduler.Tenants); err != nil {
		return refuse(err)
	}
	applied := old
	applied.TLS.CertFile, applied.TLS.KeyFile = next.TLS.CertFile, next.TLS.KeyFile
	applied.Scheduler.Tenants = next.Scheduler.Tenants
	applied.Gateway.ShutdownGrace = next.Gateway.ShutdownGrace
	// The file sets no Store, so the gateway keeps the one it started
	// with.
	if err := to.limits.SetRateLimits(next.RateLimits.RateLimits); err != nil {
		log.Error("rate limits not reloaded", "err", err)
	} else {
		// The store and its Redis settings stay as started.
		applied.RateLimits.Default = next.RateLimits.Default
		applied.RateLimits.Tenants = next.RateLimits.Tenants
		applied.RateLimits.CutOff = next.RateLimits.CutOff
	}
	if err := to.models.SetPolicy(registryPolicy(next)); err != nil {
		log.Error("model repository policy not reloaded", "err", err)
	} else {
		applied.ModelRepository.Poll = next.ModelRepository.Poll
		applied.ModelRepository.AutoPromote = next.ModelRepository.AutoPromote
		applied.ModelRepository.DrainTimeout = next.ModelRepository.DrainTimeout
	}
	// An upstream whose entry is unchanged keeps its connections and the
	// requests on it; a changed or new one starts afresh, and one removed
	// takes no more requests and closes once its last one ends. Files it
	// names (CA, client certificate, credential) are read again.
	if err := to.upstreams.Update(next.Upstreams); err != nil {
		log.Error("upstreams not reloaded", "err", err)
	} else {
		applied.Upstreams = next.Upstreams
	}
	restart := changedKeys(applied, next)
	log.Info("config reloaded", "tenants", len(next.Scheduler.Tenants), "rate_limit_tenants", len(next.RateLimits.Tenants),
		"cert_file", certFile, "shutdown_grace", time.Duration(next.Gateway.ShutdownGrace),
		"needs_restart", strings.Join(restart, ","))
	return applied
}

// changedKeys lists the JSON keys whose values differ between a and b,
// one level into sections ("workers.count", "models"). A struct embedded
// in a section (the library's part of it, gateway.Config say) lends the
// section its keys; fields the file does not write (json:"-") are not
// keys.
func changedKeys(a, b Config) []string {
	var out []string
	var walk func(prefix string, va, vb reflect.Value)
	walk = func(prefix string, va, vb reflect.Value) {
		t := va.Type()
		for i := range t.NumField() {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			fa, fb := va.Field(i), vb.Field(i)
			switch {
			case name == "-" || !f.IsExported():
				continue
			case f.Anonymous && fa.Kind() == reflect.Struct:
				walk(prefix, fa, fb)
				continue
			case fa.Kind() == reflect.Struct && prefix == "":
				walk(name+".", fa, fb)
				continue
			}
			ja, _ := json.Marshal(fa.Interface())
			jb, _ := json.Marshal(fb.Interface())
			if string(ja) != string(jb) {
				out = append(out, prefix+name)
			}
		}
	}
	walk("", reflect.ValueOf(a), reflect.ValueOf(b))
	return out
}
