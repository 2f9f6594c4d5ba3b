package tlsbind

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"sync/atomic"
	"testing"
	"time"
)

// TestMemoryStrikesForgetShortEntriesBesideLongOnes: tickets (a day-long
// TTL) struck among 100,000 proofs (20s) over a simulated hour must not
// keep the proofs alive. The register holds what a user expects it to: the
// proofs of about the last TTL and every ticket, all still refused, while
// an expired proof is forgotten.
func TestMemoryStrikesForgetShortEntriesBesideLongOnes(t *testing.T) {
	m := NewMemoryStrikes()
	now := time.Now()
	m.now = func() time.Time { return now }
	ctx := context.Background()
	strike := func(key string, ttl time.Duration) bool {
		t.Helper()
		first, err := m.Strike(ctx, key, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return first
	}
	const (
		proofs    = 100_000
		proofTTL  = 20 * time.Second
		ticketTTL = 24 * time.Hour
		tickets   = 60 // one a simulated minute
	)
	step := time.Hour / proofs
	for i := range proofs {
		if i%(proofs/tickets) == 0 {
			if !strike(fmt.Sprintf("ticket:%d", i), ticketTTL) {
				t.Fatalf("ticket %d refused at first use", i)
			}
		}
		if !strike(fmt.Sprintf("proof:%d", i), proofTTL) {
			t.Fatalf("proof %d refused at first use", i)
		}
		now = now.Add(step)
	}
	live := int(proofTTL / step) // proofs struck within the last TTL
	// Each shard forgets at its next Strike, so a few expired entries per
	// shard may linger; half a TTL's worth more is the bound asserted.
	n, limit := strikeCount(m), live+live/2+tickets
	if n > limit {
		t.Errorf("after %d proofs and %d tickets over an hour the register holds %d entries, want at most %d (%d proofs live)", proofs, tickets, n, limit, live)
	}
	t.Logf("%d entries after an hour: %d proofs live within the TTL, %d tickets", n, live, tickets)
	for i := 0; i < proofs; i += proofs / tickets {
		if strike(fmt.Sprintf("ticket:%d", i), ticketTTL) {
			t.Errorf("ticket %d accepted again within its TTL", i)
		}
	}
	if strike(fmt.Sprintf("proof:%d", proofs-1), proofTTL) {
		t.Error("the last proof accepted again within its TTL")
	}
	if !strike("proof:0", proofTTL) {
		t.Error("the first proof, expired an hour ago, is still refused")
	}
}

// strikeCount is how many entries m holds.
func strikeCount(m *MemoryStrikes) int {
	n := 0
	for i := range m.shards {
		s := &m.shards[i]
		s.mu.Lock()
		n += len(s.seen)
		s.mu.Unlock()
	}
	return n
}

// BenchmarkMemoryStrikes strikes fresh proof keys on a simulated clock
// that advances 100µs per strike (10,000 proofs a second, 200,000 live at a
// 20s TTL), beside a day-long ticket entry.
func BenchmarkMemoryStrikes(b *testing.B) {
	m := NewMemoryStrikes()
	base := time.Now()
	var ticks atomic.Int64
	m.now = func() time.Time { return base.Add(time.Duration(ticks.Load()) * 100 * time.Microsecond) }
	ctx := context.Background()
	m.Strike(ctx, "ticket:0", 24*time.Hour)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		var id [8]byte
		for pb.Next() {
			binary.BigEndian.PutUint64(id[:], uint64(ticks.Add(1)))
			if first, _ := m.Strike(ctx, "proof:"+hex.EncodeToString(id[:]), 20*time.Second); !first {
				b.Fatal("a fresh key was refused")
			}
		}
	})
}
