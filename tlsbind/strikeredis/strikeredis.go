// Package strikeredis is tlsbind's strike register for several gateway
// instances, kept in Redis. It lives apart from tlsbind so that clients,
// which import tlsbind for proofs, do not carry a Redis client.
package strikeredis

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"h3infer/tlsbind"
)

// Strikes is a tlsbind.StrikeRegister shared by instances: SET NX with an
// expiry, so the first instance to see a value wins everywhere.
type Strikes struct {
	client *redis.Client
	prefix string
}

var _ tlsbind.StrikeRegister = (*Strikes)(nil)

// New uses client, namespacing keys under prefix (default
// "h3infer:strike:").
func New(client *redis.Client, prefix string) *Strikes {
	if prefix == "" {
		prefix = "h3infer:strike:"
	}
	return &Strikes{client: client, prefix: prefix}
}

// Strike implements tlsbind.StrikeRegister.
func (r *Strikes) Strike(ctx context.Context, key string, ttl time.Duration) (bool, error) {
	ok, err := r.client.SetNX(ctx, r.prefix+key, 1, ttl).Result()
	if err != nil {
		return false, fmt.Errorf("strike register: redis: %w", err)
	}
	return ok, nil
}

// Durable implements tlsbind.StrikeRegister: Redis outlives a gateway.
func (r *Strikes) Durable() bool { return true }
