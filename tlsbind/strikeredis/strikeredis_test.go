package strikeredis

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"h3infer/internal/redistest"
)

func TestRedisStrikesSharedBetweenInstances(t *testing.T) {
	addr := redistest.StartTCP(t)
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
