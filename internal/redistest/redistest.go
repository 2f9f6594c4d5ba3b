// Package redistest starts a private redis-server (Debian package
// redis-server, installed by .ci/run) for tests that need real shared state.
// Each server has its own temporary directory and is stopped when the test
// ends.
package redistest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Options shape a server started by StartServer. The zero value is a
// plain TCP server on loopback with no password.
type Options struct {
	// Users are ACL users to create. When any is set the default user is
	// turned off, so that every client must log in as one of them.
	Users []User
	// TLS, when set, makes the server speak only TLS on its port.
	TLS *TLSFiles
}

// User is one ACL user.
type User struct {
	Name, Password string
	// Rules are ACL rules as ACL SETUSER takes them, one per element.
	// Default: every command on every key and channel.
	Rules []string
}

// TLSFiles are PEM files for redis-server's TLS port. Clients are not asked
// for certificates.
type TLSFiles struct{ CertFile, KeyFile, CAFile string }

// Server is a running redis-server.
type Server struct {
	// Addr is the loopback host:port the server listens on.
	Addr string
	// PID is the server's process id, for tests that stop it themselves.
	PID  int
	opts Options

	cmd    *exec.Cmd
	exited chan struct{}
	once   sync.Once
	// args and probe start it again (Restart).
	args  []string
	probe *redis.Options
	dir   string
}

// Restart starts a stopped server again on the same address, empty (it
// keeps no data on disk), and waits until it answers.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Stop()
	n := run(t, s.dir, s.opts, s.probe, s.args...)
	s.PID, s.cmd, s.exited, s.once = n.PID, n.cmd, n.exited, sync.Once{}
	t.Cleanup(s.Stop)
}

// URL is a redis:// or rediss:// URL for the server, logged in as user
// (none: no credentials) with password.
func (s *Server) URL(user, password string) string {
	scheme := "redis"
	if s.opts.TLS != nil {
		scheme = "rediss"
	}
	u := scheme + "://"
	if user != "" {
		u += user + ":" + password + "@"
	}
	return u + s.Addr + "/0"
}

// Stop kills the server and waits until it has exited. Clients see their
// connections refused from then on.
func (s *Server) Stop() {
	s.once.Do(func() {
		s.cmd.Process.Kill()
		<-s.exited
	})
}

// Start runs redis-server on a Unix socket in the test's temporary
// directory until the test ends, and returns a client for it.
func Start(t testing.TB) *redis.Client {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "redis.sock")
	run(t, dir, Options{}, &redis.Options{Network: "unix", Addr: sock},
		"--port", "0", "--unixsocket", sock, "--unixsocketperm", "700")
	client := redis.NewClient(&redis.Options{Network: "unix", Addr: sock})
	t.Cleanup(func() { client.Close() })
	return client
}

// StartTCP runs redis-server on a free loopback port until the test ends,
// and returns its host:port, for code configured with an address.
func StartTCP(t testing.TB) string {
	t.Helper()
	return StartServer(t, Options{}).Addr
}

// StartServer runs redis-server with opts on a free loopback port until the
// test ends.
func StartServer(t testing.TB, opts Options) *Server {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	args := []string{"--bind", "127.0.0.1"}
	probe := &redis.Options{Addr: addr}
	if opts.TLS != nil {
		args = append(args, "--port", "0", "--tls-port", fmt.Sprint(port),
			"--tls-cert-file", opts.TLS.CertFile, "--tls-key-file", opts.TLS.KeyFile,
			"--tls-ca-cert-file", opts.TLS.CAFile, "--tls-auth-clients", "no")
		pem, err := os.ReadFile(opts.TLS.CAFile)
		if err != nil {
			t.Fatal(err)
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		probe.TLSConfig = &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
	} else {
		args = append(args, "--port", fmt.Sprint(port))
	}
	for _, u := range opts.Users {
		rules := u.Rules
		if len(rules) == 0 {
			rules = []string{"~*", "&*", "+@all"}
		}
		args = append(append(args, "--user", u.Name, "on", ">"+u.Password), rules...)
	}
	if len(opts.Users) > 0 {
		args = append(args, "--user", "default", "off")
		probe.Username, probe.Password = opts.Users[0].Name, opts.Users[0].Password
	}
	dir := t.TempDir()
	s := run(t, dir, opts, probe, args...)
	s.Addr, s.args, s.probe, s.dir = addr, args, probe, dir
	return s
}

// run starts redis-server with args in dir and waits until a client with
// probe gets an answer.
func run(t testing.TB, dir string, opts Options, probe *redis.Options, args ...string) *Server {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("redis-server not found (apt-get install redis-server): %v", err)
	}
	args = append(slices.Clip(args), "--dir", dir, "--save", "", "--appendonly", "no",
		"--loglevel", "warning", "--logfile", filepath.Join(dir, "redis.log"))
	cmd := exec.Command(bin, args...)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	s := &Server{PID: cmd.Process.Pid, opts: opts, cmd: cmd, exited: make(chan struct{})}
	go func() { cmd.Wait(); close(s.exited) }()
	t.Cleanup(s.Stop)
	client := redis.NewClient(probe)
	defer client.Close()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := client.Ping(ctx).Err()
		cancel()
		if err == nil {
			return s
		}
		select {
		case <-s.exited:
			logText, _ := os.ReadFile(filepath.Join(dir, "redis.log"))
			t.Fatalf("redis-server exited: %v\n%s", cmd.ProcessState, logText)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server did not answer: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
