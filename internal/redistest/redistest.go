// Package redistest starts a private redis-server (Debian package
// redis-server, installed by .ci/run) for tests that need real shared state.
// Each server has its own temporary directory and is stopped when the test
// ends.
package redistest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Start runs redis-server on a Unix socket in the test's temporary
// directory until the test ends, and returns a client for it.
func Start(t testing.TB) *redis.Client {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "redis.sock")
	run(t, dir, &redis.Options{Network: "unix", Addr: sock},
		"--port", "0", "--unixsocket", sock, "--unixsocketperm", "700")
	client := redis.NewClient(&redis.Options{Network: "unix", Addr: sock})
	t.Cleanup(func() { client.Close() })
	return client
}

// StartTCP runs redis-server on a free loopback port until the test ends,
// and returns its host:port, for code configured with an address.
func StartTCP(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	run(t, t.TempDir(), &redis.Options{Addr: addr}, "--bind", "127.0.0.1", "--port", fmt.Sprint(port))
	return addr
}

// run starts redis-server with args in dir and waits until a client with
// opts gets an answer.
func run(t testing.TB, dir string, opts *redis.Options, args ...string) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("redis-server not found (apt-get install redis-server): %v", err)
	}
	args = append(args, "--dir", dir, "--save", "", "--appendonly", "no",
		"--loglevel", "warning", "--logfile", filepath.Join(dir, "redis.log"))
	cmd := exec.Command(bin, args...)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	probe := redis.NewClient(opts)
	defer probe.Close()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := probe.Ping(ctx).Err()
		cancel()
		if err == nil {
			return
		}
		select {
		case <-exited:
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
