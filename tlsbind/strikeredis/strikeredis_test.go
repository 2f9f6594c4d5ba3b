package strikeredis

import (
	"context"
	"fmt"
	"io"
	"net"
	"os/exec"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// startRedis runs Debian's redis-server on a free loopback port in its own
// directory and stops it when the test ends.
func startRedis(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("redis-server is not installed (.ci/run installs it): %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	cmd := exec.Command(bin, "--bind", "127.0.0.1", "--port", fmt.Sprint(port), "--dir", t.TempDir(), "--save", "", "--appendonly", "no")
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	rc := redis.NewClient(&redis.Options{Addr: addr})
	defer rc.Close()
	for deadline := time.Now().Add(20 * time.Second); rc.Ping(context.Background()).Err() != nil; {
		if time.Now().After(deadline) {
			t.Fatalf("redis-server on %s did not answer", addr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return addr
}

func TestRedisStrikesSharedBetweenInstances(t *testing.T) {
	addr := startRedis(t)
	c1, c2 := redis.NewClient(&redis.Options{Addr: addr}), redis.NewClient(&redis.Options{Addr: addr})
	defer c1.Close()
	defer c2.Close()
	a, b := New(c1, ""), New(c2, "")
	ctx := context.Background()
	if first, err := a.Strike(ctx, "n1", 300*time.Millisecond); err != nil || !first {
		t.Fatalf("first strike on a: %v %v", first, err)
	}
	if first, err := b.Strike(ctx, "n1", 300*time.Millisecond); err != nil || first {
		t.Fatalf("same value on b: first=%v err=%v, want refused", first, err)
	}
	time.Sleep(400 * time.Millisecond)
	if first, _ := b.Strike(ctx, "n1", time.Second); !first {
		t.Error("value still refused after its expiry")
	}
}
