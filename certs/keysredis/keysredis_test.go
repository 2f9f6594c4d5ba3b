package keysredis

import (
	"context"
	"fmt"
	"io"
	"net"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// startRedis runs a real redis-server on a free loopback port for the test.
func startRedis(t *testing.T) *redis.Client {
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
	rc := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port)})
	t.Cleanup(func() {
		rc.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	deadline := time.Now().Add(20 * time.Second)
	for rc.Ping(context.Background()).Err() != nil {
		if time.Now().After(deadline) {
			t.Fatal("redis-server did not answer within 20s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return rc
}

func TestStoreSharesAndRotatesOnce(t *testing.T) {
	rc := startRedis(t)
	ctx := context.Background()
	a, b := New(rc, ""), New(rc, "")
	t0 := time.Now()
	ka, err := a.Current(ctx, t0, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := b.Current(ctx, t0, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if ka.TicketKeys[0] != kb.TicketKeys[0] || ka.StatelessResetKey != kb.StatelessResetKey {
		t.Fatal("two instances got different keys from one Redis")
	}
	var wg sync.WaitGroup
	got := make([][32]byte, 8)
	for i := range got {
		wg.Go(func() {
			st := a
			if i%2 == 1 {
				st = b
			}
			k, err := st.Current(ctx, t0.Add(90*time.Minute), time.Hour)
			if err != nil {
				t.Error(err)
				return
			}
			if len(k.TicketKeys) != 2 || k.TicketKeys[1] != ka.TicketKeys[0] {
				t.Errorf("after rotation: %d keys, previous key kept: %v", len(k.TicketKeys), len(k.TicketKeys) == 2 && k.TicketKeys[1] == ka.TicketKeys[0])
			}
			got[i] = k.TicketKeys[0]
		})
	}
	wg.Wait()
	for i := range got {
		if got[i] != got[0] || got[i] == ka.TicketKeys[0] {
			t.Fatalf("instances due at once rotated more than once or not at all")
		}
	}
}
