package upstream

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"time"

	"h3infer/config"
)

// Config is one entry of the configuration file's "upstreams" list, as the
// file writes it; its zero values mean the documented defaults.
type Config struct {
	// Name names the upstream in metrics labels, logs and /debug/state:
	// required, unique, letters, digits, '.', '_' and '-' only.
	Name string `json:"name"`
	// URL is the upstream's base URL, such as https://regional:8443;
	// /v1/... is appended. https is required unless the host is a
	// loopback address, where http (HTTP/1.1) is allowed too.
	URL string `json:"url"`
	// Protocol is "h2" (the default: HTTP/2 over TLS, HTTP/1.1 when the
	// server offers no h2) or "h3" (HTTP/3 over QUIC).
	Protocol string `json:"protocol"`
	// Models lists the models the upstream serves; when empty they are
	// discovered from its GET /v1/models.
	Models []string `json:"models"`
	// DiscoverInterval is how often the upstream's /v1/models is fetched,
	// both to refresh discovered models and as the health probe that
	// brings an ejected upstream back. Default 5s.
	DiscoverInterval config.Duration `json:"discover_interval"`
	// Slots bounds the requests in flight to the upstream. Default 64.
	Slots int `json:"slots"`
	// Timeout bounds one request from its start to its last byte.
	// Default 10m.
	Timeout config.Duration `json:"timeout"`
	// StallTimeout bounds the wait for the response's headers and between
	// two events of its stream. Default 30s.
	StallTimeout config.Duration `json:"stall_timeout"`
	// CAFile holds the PEM roots the upstream's certificate is checked
	// against; empty: the system's roots.
	CAFile string `json:"ca_file"`
	// CertFile and KeyFile are the client certificate presented to the
	// upstream (both or neither).
	CertFile string `json:"cert_file"`
	KeyFile  string `json:"key_file"`
	// CredentialFile holds the bearer token presented to the upstream,
	// surrounding white space trimmed. A file group or others may read is
	// refused. The client's own token is never passed on.
	CredentialFile string `json:"credential_file"`
	// CredentialEnv names an environment variable holding the token
	// instead. At most one of the two.
	CredentialEnv string `json:"credential_env"`
	// Priority says how a request's RFC 9218 urgency u (0 most urgent)
	// becomes the request body's "priority" field, which the engines
	// read in opposite orders (see PriorityOff and the others).
	Priority string `json:"priority"`
	// EjectAfter is how many consecutive failures (connection errors,
	// 5xx other than 503, stalls, broken streams, failed probes) take the
	// upstream out of dispatch until a probe succeeds. Default 3.
	EjectAfter int `json:"eject_after"`
}

// Protocols.
const (
	ProtocolH2 = "h2"
	ProtocolH3 = "h3"
)

// Urgency mappings onto the request body's "priority" field.
const (
	// PriorityOff sends no priority field: vLLM refuses any value but 0
	// unless it runs --scheduling-policy priority.
	PriorityOff = "off"
	// PriorityLowerFirst sends priority = u: lower values run first, as in
	// vLLM with --scheduling-policy priority and SGLang with
	// --schedule-low-priority-values-first.
	PriorityLowerFirst = "lower-first"
	// PriorityHigherFirst sends priority = 7-u: higher values run first,
	// as in SGLang's default order with --enable-priority-scheduling.
	PriorityHigherFirst = "higher-first"
)

// Defaults for Config's zero values, and the bounds Validate enforces.
const (
	DefaultDiscoverInterval = 5 * time.Second
	DefaultSlots            = 64
	DefaultTimeout          = 10 * time.Minute
	DefaultStallTimeout     = 30 * time.Second
	DefaultEjectAfter       = 3
	MaxSlots                = 4096
	maxNameLen              = 64
)

var validName = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)

// WithDefaults returns c with every zero value replaced by its default.
func (c Config) WithDefaults() Config {
	if c.Protocol == "" {
		c.Protocol = ProtocolH2
	}
	if c.DiscoverInterval == 0 {
		c.DiscoverInterval = config.Duration(DefaultDiscoverInterval)
	}
	if c.Slots == 0 {
		c.Slots = DefaultSlots
	}
	if c.Timeout == 0 {
		c.Timeout = config.Duration(DefaultTimeout)
	}
	if c.StallTimeout == 0 {
		c.StallTimeout = config.Duration(DefaultStallTimeout)
	}
	if c.Priority == "" {
		c.Priority = PriorityOff
	}
	if c.EjectAfter == 0 {
		c.EjectAfter = DefaultEjectAfter
	}
	return c
}

// Validate reports every problem with c at once, each naming its key as
// the configuration file writes it under key, such as
// "upstreams[0].url: ...". It reads no file; NewSet and Update do, and
// name the key of a file they cannot use.
func (c Config) Validate(key string) error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: "+format, append([]any{key, field}, args...)...))
	}
	switch {
	case c.Name == "":
		bad("name", "must not be empty")
	case len(c.Name) > maxNameLen || !validName.MatchString(c.Name):
		bad("name", "must be at most %d letters, digits, '.', '_' or '-', got %q", maxNameLen, c.Name)
	}
	c = c.WithDefaults()
	if _, err := parseBase(c.URL, c.Protocol); err != nil {
		bad("url", "%v", err)
	}
	if c.Protocol != ProtocolH2 && c.Protocol != ProtocolH3 {
		bad("protocol", "must be %q or %q, got %q", ProtocolH2, ProtocolH3, c.Protocol)
	}
	seen := map[string]bool{}
	for i, m := range c.Models {
		switch {
		case m == "":
			bad(fmt.Sprintf("models[%d]", i), "must not be empty")
		case strings.Contains(m, "@"):
			bad(fmt.Sprintf("models[%d]", i), "must be a model name without @version, got %q", m)
		case seen[m]:
			bad(fmt.Sprintf("models[%d]", i), "%q is listed twice", m)
		}
		seen[m] = true
	}
	if c.DiscoverInterval < 0 {
		bad("discover_interval", "must be positive, got %s", c.DiscoverInterval)
	}
	if c.Slots < 1 || c.Slots > MaxSlots {
		bad("slots", "must be 1..%d, got %d", MaxSlots, c.Slots)
	}
	if c.Timeout < 0 {
		bad("timeout", "must be positive, got %s", c.Timeout)
	}
	if c.StallTimeout < 0 {
		bad("stall_timeout", "must be positive, got %s", c.StallTimeout)
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		bad("cert_file", "cert_file and key_file go together: set both or neither")
	}
	if c.CredentialFile != "" && c.CredentialEnv != "" {
		bad("credential_file", "set at most one of credential_file and credential_env")
	}
	switch c.Priority {
	case PriorityOff, PriorityLowerFirst, PriorityHigherFirst:
	default:
		bad("priority", "must be %q, %q or %q, got %q", PriorityOff, PriorityLowerFirst, PriorityHigherFirst, c.Priority)
	}
	if c.EjectAfter < 1 {
		bad("eject_after", "must be >= 1, got %d", c.EjectAfter)
	}
	return errors.Join(errs...)
}

// ValidateAll checks each entry of the "upstreams" list and that no name
// is used twice.
func ValidateAll(list []Config) error {
	var errs []error
	first := map[string]int{}
	for i, c := range list {
		key := fmt.Sprintf("upstreams[%d]", i)
		errs = append(errs, c.Validate(key))
		if j, ok := first[c.Name]; ok && c.Name != "" {
			errs = append(errs, fmt.Errorf("%s.name: %q is already the name of upstreams[%d]", key, c.Name, j))
		} else {
			first[c.Name] = i
		}
	}
	return errors.Join(errs...)
}

// parseBase checks an upstream's base URL and returns it without a
// trailing slash.
func parseBase(raw, protocol string) (*url.URL, error) {
	if raw == "" {
		return nil, errors.New("must not be empty")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, err
	}
	switch {
	case u.Scheme != "https" && u.Scheme != "http":
		return nil, fmt.Errorf("scheme must be https (or http to a loopback host), got %q", u.Scheme)
	case u.Host == "":
		return nil, fmt.Errorf("%q names no host", raw)
	case u.User != nil:
		return nil, errors.New("must carry no user or password; use credential_file")
	case u.RawQuery != "" || u.Fragment != "":
		return nil, errors.New("must have no query or fragment")
	case u.Scheme == "http" && !isLoopback(u.Hostname()):
		return nil, fmt.Errorf("http is allowed only to a loopback host, got %q; use https", u.Hostname())
	case u.Scheme == "http" && protocol == ProtocolH3:
		return nil, errors.New("protocol h3 needs an https URL")
	}
	u.Path = strings.TrimRight(u.Path, "/")
	if strings.HasSuffix(u.Path, "/v1") {
		return nil, fmt.Errorf("must not end in /v1, which is appended: write %s://%s%s", u.Scheme, u.Host, strings.TrimSuffix(u.Path, "/v1"))
	}
	return u, nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// sameConfig reports whether a and b configure the same upstream.
func sameConfig(a, b Config) bool {
	ma, mb := a.Models, b.Models
	a.Models, b.Models = nil, nil
	return slices.Equal(ma, mb) && reflect.DeepEqual(a, b)
}
