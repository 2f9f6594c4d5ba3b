package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Config is the one typed configuration file of `h3infer serve` (JSON). It
// is decoded strictly: an unknown key is an error. A zero value means the
// documented default; an out-of-range value is an error, never clamped.
// docs/CONFIG.md documents every key.
type Config struct {
	// Listen is the host:port for HTTP/3 (UDP) and HTTP/1.1+2 (TCP) on one
	// port number. Default 127.0.0.1:8443.
	Listen string `json:"listen"`
	// Admin is the plain-HTTP host:port for /healthz, /readyz and /metrics.
	// Default 127.0.0.1:9090.
	Admin string `json:"admin"`
	// StateDir holds development certificates and the demo model.
	// Default .h3infer under the working directory.
	StateDir string `json:"state_dir"`
	// ONNXRuntimeLib is the path of libonnxruntime.so; the environment
	// variable ONNXRUNTIME_LIB overrides it. Default: the library `make`
	// fetched next to the binary, else the dynamic loader's search path.
	ONNXRuntimeLib string `json:"onnxruntime_lib"`

	TLS       TLSConfig       `json:"tls"`
	Workers   WorkersConfig   `json:"workers"`
	Scheduler SchedulerConfig `json:"scheduler"`
	Gateway   GatewayConfig   `json:"gateway"`
	// Models to serve. Empty: the demo model under the name "demo", written
	// into <state_dir>/models/demo/1 when missing.
	Models []ModelConfig `json:"models"`
}

// TLSConfig names a certificate to serve. Both empty: the development CA and
// leaf under <state_dir>/certs, created when missing.
type TLSConfig struct {
	CertFile string `json:"cert_file"`
	KeyFile  string `json:"key_file"`
}

// WorkersConfig sizes the worker processes.
type WorkersConfig struct {
	// Count of worker processes. Default 2.
	Count int `json:"count"`
	// Slots is the number of sequences one worker runs at once. Default 4.
	Slots int `json:"slots"`
	// IntraOpThreads per ONNX Runtime session. Default 1.
	IntraOpThreads int `json:"intra_op_threads"`
	// RingBytes is the size of each shared-memory ring. Default 1 MiB; a
	// power of two between 64 KiB and 1 GiB.
	RingBytes int `json:"ring_bytes"`
	// CallBuffer is how many unread events one request may hold in the
	// gateway before it is cancelled as too slow. Default 1024.
	CallBuffer int `json:"call_buffer"`
	// HangTimeout is how long a ready worker's heartbeat may stand still
	// before the worker is killed and restarted. Default "10s".
	HangTimeout Duration `json:"hang_timeout"`
}

// SchedulerConfig bounds admission.
type SchedulerConfig struct {
	// MaxQueue is how many requests may wait for a worker slot. Default 256.
	MaxQueue int `json:"max_queue"`
	// RetryAfter is the advice sent with 503 answers. Default "1s".
	RetryAfter Duration `json:"retry_after"`
}

// GatewayConfig shapes the HTTP side.
type GatewayConfig struct {
	// MaxBodyBytes bounds a request body. Default 1048576.
	MaxBodyBytes int64 `json:"max_body_bytes"`
	// DefaultMaxTokens applies when a request names no max_tokens. Default 256.
	DefaultMaxTokens int `json:"default_max_tokens"`
}

// ModelConfig names one model directory (model.onnx, tokenizer.json,
// model.json).
type ModelConfig struct {
	Name string `json:"name"`
	Dir  string `json:"dir"`
}

// Duration is a time.Duration written as a string such as "800ms".
type Duration time.Duration

// UnmarshalJSON accepts Go duration strings.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a duration string such as \"800ms\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// loadConfig reads a config file strictly; an empty path gives the defaults.
func loadConfig(path string) (Config, error) {
	var c Config
	if path == "" {
		return c, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("config: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	if dec.More() {
		return c, fmt.Errorf("config %s: trailing data after the JSON object", path)
	}
	return c, nil
}

// withDefaults fills zero values with the documented defaults.
func (c Config) withDefaults() Config {
	def := func(v *string, d string) {
		if *v == "" {
			*v = d
		}
	}
	defInt := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.Listen, "127.0.0.1:8443")
	def(&c.Admin, "127.0.0.1:9090")
	def(&c.StateDir, ".h3infer")
	defInt(&c.Workers.Count, 2)
	defInt(&c.Workers.Slots, 4)
	defInt(&c.Workers.IntraOpThreads, 1)
	defInt(&c.Workers.RingBytes, 1<<20)
	defInt(&c.Workers.CallBuffer, 1024)
	if c.Workers.HangTimeout == 0 {
		c.Workers.HangTimeout = Duration(10 * time.Second)
	}
	defInt(&c.Scheduler.MaxQueue, 256)
	if c.Scheduler.RetryAfter == 0 {
		c.Scheduler.RetryAfter = Duration(time.Second)
	}
	if c.Gateway.MaxBodyBytes == 0 {
		c.Gateway.MaxBodyBytes = 1 << 20
	}
	defInt(&c.Gateway.DefaultMaxTokens, 256)
	return c
}

// validate reports every problem at once, each naming its key. It runs on a
// config with defaults applied, before any socket opens.
func (c Config) validate() error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, a...)))
	}
	for key, addr := range map[string]string{"listen": c.Listen, "admin": c.Admin} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			bad(key, "want host:port, got %q", addr)
		}
	}
	if c.Listen == c.Admin && c.Listen != "" && !hasPortZero(c.Listen) {
		bad("admin", "must differ from listen, both are %q", c.Listen)
	}
	if (c.TLS.CertFile == "") != (c.TLS.KeyFile == "") {
		bad("tls", "cert_file and key_file go together, got cert_file=%q key_file=%q", c.TLS.CertFile, c.TLS.KeyFile)
	}
	if c.Workers.Count < 1 || c.Workers.Count > 64 {
		bad("workers.count", "must be 1..64, got %d", c.Workers.Count)
	}
	if c.Workers.Slots < 1 || c.Workers.Slots > 1024 {
		bad("workers.slots", "must be 1..1024, got %d", c.Workers.Slots)
	}
	if c.Workers.IntraOpThreads < 1 || c.Workers.IntraOpThreads > 256 {
		bad("workers.intra_op_threads", "must be 1..256, got %d", c.Workers.IntraOpThreads)
	}
	if r := c.Workers.RingBytes; r < 64<<10 || r > 1<<30 || r&(r-1) != 0 {
		bad("workers.ring_bytes", "must be a power of two from 65536 to 1073741824, got %d", r)
	}
	if c.Workers.CallBuffer < 1 || c.Workers.CallBuffer > 1<<20 {
		bad("workers.call_buffer", "must be 1..1048576, got %d", c.Workers.CallBuffer)
	}
	if c.Workers.HangTimeout < Duration(100*time.Millisecond) {
		bad("workers.hang_timeout", "must be at least 100ms, got %s", time.Duration(c.Workers.HangTimeout))
	}
	if c.Scheduler.MaxQueue < 1 {
		bad("scheduler.max_queue", "must be > 0, got %d", c.Scheduler.MaxQueue)
	}
	if c.Scheduler.RetryAfter < 0 {
		bad("scheduler.retry_after", "must be positive, got %s", time.Duration(c.Scheduler.RetryAfter))
	}
	if c.Gateway.MaxBodyBytes < 1024 {
		bad("gateway.max_body_bytes", "must be at least 1024, got %d", c.Gateway.MaxBodyBytes)
	}
	if c.Gateway.DefaultMaxTokens < 1 {
		bad("gateway.default_max_tokens", "must be > 0, got %d", c.Gateway.DefaultMaxTokens)
	}
	seen := map[string]bool{}
	for i, m := range c.Models {
		key := fmt.Sprintf("models[%d]", i)
		if m.Name == "" {
			bad(key+".name", "must not be empty")
		} else if seen[m.Name] {
			bad(key+".name", "%q is listed twice", m.Name)
		}
		seen[m.Name] = true
		if m.Dir == "" {
			bad(key+".dir", "must not be empty")
		} else if _, err := os.Stat(filepath.Join(m.Dir, "model.onnx")); err != nil {
			bad(key+".dir", "no model.onnx: %v", err)
		}
	}
	return errors.Join(errs...)
}

func hasPortZero(addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	return err == nil && port == "0"
}
