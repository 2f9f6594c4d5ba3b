package tokenizers

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"h3infer/workerconf"
)

// DefaultMaxModels is how many versions' tokenizers a Cache keeps by
// default. A real tokenizer.json of 10-30 MB parses into a few times that
// in maps; the versions a gateway routes to at once are a primary, maybe
// a canary, per model.
const DefaultMaxModels = 4

// ErrSynthetic is the synthetic model's directory: it has no tokenizer.
var ErrSynthetic = errors.New("the synthetic model has no tokenizer")

// Cache holds the Models of up to a bound of version directories, the
// least recently used dropped first. A version directory is never
// rewritten in place (a new version is a new directory), so an entry
// never goes stale; one whose version was unloaded ages out.
type Cache struct {
	max int

	mu      sync.Mutex
	entries map[string]*entry
	clock   uint64 // counts Gets, for least-recently-used
}

// entry is one directory's Model, or its load in progress.
type entry struct {
	ready chan struct{} // closed when m or err is set
	m     *Model
	err   error
	used  uint64 // Cache.clock at the last Get
}

// New makes a Cache that keeps at most max directories' Models; 0 means
// DefaultMaxModels.
func New(max int) (*Cache, error) {
	if max < 0 {
		return nil, fmt.Errorf("tokenizers: max models must be >= 0, got %d", max)
	}
	if max == 0 {
		max = DefaultMaxModels
	}
	return &Cache{max: max, entries: map[string]*entry{}}, nil
}

// Get returns the Model of version directory dir, reading it on first
// use. Concurrent Gets of one directory share one read, done by the first
// caller in its own goroutine; the others wait until it is done or their
// ctx ends. A failed read is not kept: the next Get tries again.
func (c *Cache) Get(ctx context.Context, dir string) (*Model, error) {
	if _, synthetic, _ := workerconf.ParseSynthetic(dir); synthetic {
		return nil, ErrSynthetic
	}
	c.mu.Lock()
	c.clock++
	e, ok := c.entries[dir]
	if ok {
		e.used = c.clock
		c.mu.Unlock()
		select {
		case <-e.ready:
			return e.m, e.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	e = &entry{ready: make(chan struct{}), used: c.clock}
	c.entries[dir] = e
	c.mu.Unlock()

	m, err := load(dir)
	c.mu.Lock()
	e.m, e.err = m, err
	close(e.ready)
	if err != nil {
		delete(c.entries, dir)
	} else {
		c.evict()
	}
	c.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("tokenizer of %s: %w", dir, err)
	}
	return m, nil
}

// evict drops the least recently used loaded entries past the bound;
// loads in progress are not counted against it. c.mu held.
func (c *Cache) evict() {
	for {
		var oldest string
		var oldestUsed uint64
		loaded := 0
		for dir, e := range c.entries {
			select {
			case <-e.ready:
			default:
				continue
			}
			loaded++
			if oldest == "" || e.used < oldestUsed {
				oldest, oldestUsed = dir, e.used
			}
		}
		if loaded <= c.max {
			return
		}
		delete(c.entries, oldest)
	}
}

// Len is how many directories' Models the cache holds.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
