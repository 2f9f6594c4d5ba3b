package tlsbind

import (
	"context"
	"hash/maphash"
	"sync"
	"time"
)

// StrikeRegister remembers single-use values (early proof nonces, ticket
// ids) for a while. Strike records key for ttl and reports whether this was
// its first use.
type StrikeRegister interface {
	Strike(ctx context.Context, key string, ttl time.Duration) (first bool, err error)
	// Durable reports whether the register outlives this process. One that
	// does not forgets everything at restart, so 0-RTT must wait one
	// freshness window after start-up.
	Durable() bool
}

const memoryShards = 32

// MemoryStrikes is a StrikeRegister for one instance: sharded maps whose
// expired entries are swept as new ones arrive.
type MemoryStrikes struct {
	seed   maphash.Seed
	shards [memoryShards]memoryShard
	now    func() time.Time
}

type memoryShard struct {
	mu        sync.Mutex
	seen      map[string]time.Time // key → expiry
	nextSweep time.Time
}

// NewMemoryStrikes makes an empty in-memory register.
func NewMemoryStrikes() *MemoryStrikes {
	m := &MemoryStrikes{seed: maphash.MakeSeed(), now: time.Now}
	for i := range m.shards {
		m.shards[i].seen = make(map[string]time.Time)
	}
	return m
}

// Strike implements StrikeRegister.
func (m *MemoryStrikes) Strike(_ context.Context, key string, ttl time.Duration) (bool, error) {
	s := &m.shards[maphash.String(m.seed, key)%memoryShards]
	now := m.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if now.After(s.nextSweep) {
		// Sweeping at most once per ttl keeps the cost amortised.
		for k, exp := range s.seen {
			if now.After(exp) {
				delete(s.seen, k)
			}
		}
		s.nextSweep = now.Add(ttl)
	}
	if exp, ok := s.seen[key]; ok && !now.After(exp) {
		return false, nil
	}
	s.seen[key] = now.Add(ttl)
	return true, nil
}

// Durable implements StrikeRegister: memory is lost at restart.
func (m *MemoryStrikes) Durable() bool { return false }
