package certs

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"h3infer/config"
)

// TestSourceConfig: the tls section decodes into SourceConfig, its
// defaults fill what is left out, and every problem names its key.
func TestSourceConfig(t *testing.T) {
	decode := func(text string) (SourceConfig, error) {
		var c SourceConfig
		dec := json.NewDecoder(bytes.NewReader([]byte(text)))
		dec.DisallowUnknownFields()
		return c, dec.Decode(&c)
	}
	c, err := decode(`{"cert_file": "c.pem", "key_file": "k.pem", "acme": {"hosts": ["gw.example.com"], "ca_file": "ca.pem"}}`)
	if err != nil {
		t.Fatal(err)
	}
	if c = c.WithDefaults(); time.Duration(c.WatchInterval) != DefaultWatchInterval || c.ACME.CAFile != "ca.pem" {
		t.Errorf("decoded with defaults: %+v", c)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("valid section refused: %v", err)
	}
	for name, tc := range map[string]struct{ text, want string }{
		"half a pair":      {`{"cert_file": "c.pem"}`, "tls: cert_file and key_file go together"},
		"watched too fast": {`{"watch_interval": "1ms"}`, "tls.watch_interval:"},
		"IP literal":       {`{"acme": {"hosts": ["gw.example.com", "192.0.2.1"]}}`, "tls.acme.hosts[1]:"},
		"no dot":           {`{"acme": {"hosts": ["localhost"]}}`, "tls.acme.hosts[0]:"},
		"email, no hosts":  {`{"acme": {"email": "ops@example.com"}}`, "tls.acme.hosts:"},
	} {
		c, err := decode(tc.text)
		if err == nil {
			err = c.Validate()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want one saying %s", name, err, tc.want)
		}
	}
	if _, err := decode(`{"acme": {"root_cas": []}}`); err == nil {
		t.Error("a key the file does not write accepted")
	}
}

func TestRotatorConfig(t *testing.T) {
	var c RotatorConfig
	if err := json.Unmarshal([]byte(`{"ticket_key_rotation": "6h"}`), &c); err != nil || time.Duration(c.Every) != 6*time.Hour {
		t.Errorf("decoded %+v (%v), want every 6h", c, err)
	}
	if got := time.Duration(RotatorConfig{}.WithDefaults().Every); got != DefaultRotation {
		t.Errorf("default rotation %s, want %s", got, DefaultRotation)
	}
	if err := (RotatorConfig{Every: config.Duration(time.Millisecond)}).Validate(); err == nil || !strings.Contains(err.Error(), "zero_rtt.ticket_key_rotation:") {
		t.Errorf("rotation 1ms: %v, want an error naming the key", err)
	}
}
