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
	// does not forgets everything at restart, so 0-RTT must wait out what
	// it forgot (see WarmUp) after start-up.
	Durable() bool
}

const memoryShards = 32

// MemoryStrikes is a StrikeRegister for one instance: sharded maps whose
// expired entries are dropped as new ones arrive.
//
// Entries of one TTL expire in the order they were struck, so each shard
// keeps one queue per TTL in that order and pops the expired heads on every
// Strike: an entry is forgotten at the first Strike on its shard after it
// expires, whatever else the shard holds, and no Strike scans the map. A
// day-long ticket entry no longer keeps a second-long proof entry alive.
// Callers use a handful of TTLs (one per kind of key); each costs a queue
// per shard.
type MemoryStrikes struct {
	seed   maphash.Seed
	shards [memoryShards]memoryShard
	now    func() time.Time
	// epoch makes expiries small integers on the monotonic clock.
	epoch time.Time
}

type memoryShard struct {
	mu     sync.Mutex
	seen   map[string]int64 // key → expiry, nanoseconds since epoch
	queues []*expiryQueue   // one per TTL, in order of first use
}

// expiryQueue holds a shard's entries of one TTL in order of expiry,
// live ones from head on.
type expiryQueue struct {
	ttl     time.Duration
	entries []strikeEntry
	head    int
}

type strikeEntry struct {
	key string
	exp int64
}

// NewMemoryStrikes makes an empty in-memory register.
func NewMemoryStrikes() *MemoryStrikes {
	m := &MemoryStrikes{seed: maphash.MakeSeed(), now: time.Now, epoch: time.Now()}
	for i := range m.shards {
		m.shards[i].seen = make(map[string]int64)
	}
	return m
}

// Strike implements StrikeRegister.
func (m *MemoryStrikes) Strike(_ context.Context, key string, ttl time.Duration) (bool, error) {
	s := &m.shards[maphash.String(m.seed, key)%memoryShards]
	now := int64(m.now().Sub(m.epoch))
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expire(now)
	if exp, ok := s.seen[key]; ok && now <= exp {
		return false, nil
	}
	exp := now + int64(ttl)
	s.seen[key] = exp
	s.queue(ttl).push(strikeEntry{key: key, exp: exp})
	return true, nil
}

// expire forgets the entries that expired before now.
func (s *memoryShard) expire(now int64) {
	for _, q := range s.queues {
		for q.head < len(q.entries) && now > q.entries[q.head].exp {
			e := q.entries[q.head]
			// The key may have been struck again since, with a later
			// expiry that its newer queue entry stands for.
			if exp, ok := s.seen[e.key]; ok && exp == e.exp {
				delete(s.seen, e.key)
			}
			q.entries[q.head] = strikeEntry{}
			q.head++
		}
		q.compact()
	}
}

func (s *memoryShard) queue(ttl time.Duration) *expiryQueue {
	for _, q := range s.queues {
		if q.ttl == ttl {
			return q
		}
	}
	q := &expiryQueue{ttl: ttl}
	s.queues = append(s.queues, q)
	return q
}

// push appends e. With the monotonic clock of time.Now, entries of one TTL
// arrive in order of expiry; one that does not (a clock stepped back) is
// only forgotten late, once those before it have expired.
func (q *expiryQueue) push(e strikeEntry) { q.entries = append(q.entries, e) }

// compact moves the live entries to the front once the popped ones are
// at least half of the queue, so that popping stays amortised O(1), and
// gives memory back once the queue uses a quarter of what it holds (after
// a burst).
func (q *expiryQueue) compact() {
	if q.head == 0 || q.head < len(q.entries)/2 {
		return
	}
	live := len(q.entries) - q.head
	if c := cap(q.entries); c > 1024 && c > 4*live {
		fresh := make([]strikeEntry, live, 2*live)
		copy(fresh, q.entries[q.head:])
		q.entries, q.head = fresh, 0
		return
	}
	n := copy(q.entries, q.entries[q.head:])
	clear(q.entries[n:])
	q.entries, q.head = q.entries[:n], 0
}

// Durable implements StrikeRegister: memory is lost at restart.
func (m *MemoryStrikes) Durable() bool { return false }
