package gateway

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"h3infer/config"
)

// decodeStrict decodes a section as cmd/h3infer reads the file: unknown
// keys are errors.
func decodeStrict(t *testing.T, text string, v any) error {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader([]byte(text)))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

// TestConfigFromFile: the file's gateway section decodes into Config, a
// key left out means its default, and what the file writes elsewhere
// (listen, rate limits) is not a key of the section.
func TestConfigFromFile(t *testing.T) {
	var c Config
	if err := decodeStrict(t, `{"max_body_bytes": 2048, "max_streams": 50, "header_timeout": "2s", "deadline": "45s",
		"coalesce": {"window": "5ms"}, "shutdown_grace": "1m"}`, &c); err != nil {
		t.Fatal(err)
	}
	c = c.WithDefaults()
	if c.MaxBodyBytes != 2048 || c.PreauthStreams != 50 || time.Duration(c.HeaderTimeout) != 2*time.Second ||
		time.Duration(c.QueueTimeout) != 45*time.Second || time.Duration(c.MaxDeadline) != DefaultMaxDeadline ||
		time.Duration(c.Coalesce.Window) != 5*time.Millisecond || time.Duration(c.Coalesce.BulkWindow) != DefaultCoalesceBulkWindow ||
		time.Duration(c.ShutdownGrace) != time.Minute || c.MaxConnectionsPerSource != DefaultMaxConnectionsPerSource {
		t.Errorf("decoded with defaults: %+v", c)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("valid section refused: %v", err)
	}
	for _, text := range []string{`{"listen": "127.0.0.1:1"}`, `{"rate_limits": {}}`, `{"coalesce": {"disabled": true}}`} {
		if err := decodeStrict(t, text, &Config{}); err == nil {
			t.Errorf("%s accepted as part of the gateway section", text)
		}
	}
	var rl RateLimits
	if err := decodeStrict(t, `{"default": {"requests_per_second": 2, "max_concurrent": 1}, "tenants": {"a": {"output_token_burst": 9}}, "cut_off": true, "store_retry": "20ms"}`, &rl); err != nil {
		t.Fatal(err)
	}
	if rl.Default != (TenantLimit{RequestsPerSecond: 2, MaxConcurrent: 1}) || rl.Tenants["a"].OutputTokenBurst != 9 || !rl.CutOff ||
		time.Duration(rl.StoreRetry) != 20*time.Millisecond {
		t.Errorf("rate limits decoded as %+v", rl)
	}
}

// TestConfigValidate: every problem at once, each naming its key as the
// file writes it, and the defaults pass.
func TestConfigValidate(t *testing.T) {
	if err := (Config{}).Validate(); err != nil {
		t.Errorf("defaults refused: %v", err)
	}
	err := Config{
		MaxBodyBytes: 10, DefaultMaxTokens: -1, MaxStreams: 10, PreauthStreams: 11,
		HeaderTimeout: config.Duration(-time.Second), MaxConnections: 10, MaxConnectionsPerSource: 11,
		QueueTimeout: config.Duration(time.Hour), ShutdownGrace: config.Duration(time.Hour),
		Coalesce: CoalesceConfig{MaxBuffer: -1, BulkWindow: config.Duration(time.Second)},
	}.Validate()
	for _, want := range []string{"gateway.max_body_bytes: must be at least 1024, got 10", "gateway.default_max_tokens:",
		"gateway.preauth_streams:", "gateway.header_timeout:", "gateway.max_connections_per_source:", "gateway.deadline:",
		"gateway.shutdown_grace:", "gateway.coalesce.max_buffer:", "gateway.coalesce.bulk_window:"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not say %s", err, want)
		}
	}
	if err := (RateLimits{StoreRetry: config.Duration(time.Millisecond)}).Validate(); err == nil || !strings.Contains(err.Error(), "rate_limits.store_retry:") {
		t.Errorf("store_retry 1ms: %v, want an error naming the key", err)
	}
}

// TestNewRefusesMappedProxy: peers are matched in their IPv4 form, so an
// IPv4-mapped trusted proxy could never match and is refused, as the
// configuration file's parse refuses it.
func TestNewRefusesMappedProxy(t *testing.T) {
	mapped := netip.MustParsePrefix("::ffff:10.0.0.0/104")
	_, err := New(Config{Auth: AuthConfig{Disabled: true, TrustedProxies: []netip.Prefix{mapped}}}, nil, nil, discardLog())
	if err == nil || !strings.Contains(err.Error(), "gateway.auth.trusted_proxies[0]") {
		t.Errorf("New with %s: %v, want an error naming the key", mapped, err)
	}
	if _, err := ParseTrustedProxy("::ffff:10.0.0.1"); err == nil {
		t.Error("ParseTrustedProxy accepted an IPv4-mapped address")
	}
}

// TestNewRefusesAdminHostWithPort: admin host names match without their
// port, so one written with a port could never match and is refused.
func TestNewRefusesAdminHostWithPort(t *testing.T) {
	_, err := New(Config{AdminHosts: []string{"gw1", "gw1.internal:9090"}, Auth: AuthConfig{Disabled: true}}, nil, nil, discardLog())
	if err == nil || !strings.Contains(err.Error(), "gateway.admin_hosts[1]") || strings.Contains(err.Error(), "gateway.admin_hosts[0]") {
		t.Errorf("New: %v, want an error naming gateway.admin_hosts[1] alone", err)
	}
}
