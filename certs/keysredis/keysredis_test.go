package keysredis

import (
	"context"
	"sync"
	"testing"
	"time"

	"h3infer/internal/redistest"
)

func TestStoreSharesAndRotatesOnce(t *testing.T) {
	rc := redistest.Start(t)
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
