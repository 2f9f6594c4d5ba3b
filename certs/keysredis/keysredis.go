// Package keysredis keeps the session keys that gateway instances share
// (certs.SessionKeys) in Redis, for instances that share no file system. It
// lives apart from certs so that certs alone carries no Redis client.
package keysredis

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"h3infer/certs"
)

// DefaultKey is where the keys live unless told otherwise.
const DefaultKey = "h3infer:session-keys"

// maxAttempts bounds retries when another instance wrote the key between
// our read and our write.
const maxAttempts = 8

// Store is a certs.KeyStore on one Redis key holding the keys as JSON.
// Creation and rotation run in WATCH/MULTI transactions, so when several
// instances are due at once one rotates and the others read its result.
type Store struct {
	client *redis.Client
	key    string
}

var _ certs.KeyStore = (*Store)(nil)

// New uses client and key (DefaultKey when empty).
func New(client *redis.Client, key string) *Store {
	if key == "" {
		key = DefaultKey
	}
	return &Store{client: client, key: key}
}

// Current implements certs.KeyStore.
func (s *Store) Current(ctx context.Context, now time.Time, every time.Duration) (*certs.SessionKeys, error) {
	var out *certs.SessionKeys
	txf := func(tx *redis.Tx) error {
		b, err := tx.Get(ctx, s.key).Bytes()
		var k *certs.SessionKeys
		switch {
		case errors.Is(err, redis.Nil):
			if k, err = certs.NewSessionKeys(now); err != nil {
				return err
			}
		case err != nil:
			return err
		default:
			k = new(certs.SessionKeys)
			if err := json.Unmarshal(b, k); err != nil {
				return fmt.Errorf("decode %s: %w", s.key, err)
			}
			if len(k.TicketKeys) == 0 {
				return fmt.Errorf("%s holds no ticket keys", s.key)
			}
			if !k.Due(now, every) {
				out = k
				return nil
			}
			if err := k.Rotate(now); err != nil {
				return err
			}
		}
		nb, err := json.Marshal(k)
		if err != nil {
			return err
		}
		if _, err := tx.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.Set(ctx, s.key, nb, 0)
			return nil
		}); err != nil {
			return err
		}
		out = k
		return nil
	}
	for range maxAttempts {
		err := s.client.Watch(ctx, txf, s.key)
		if errors.Is(err, redis.TxFailedErr) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("session keys: redis: %w", err)
		}
		return out, nil
	}
	return nil, fmt.Errorf("session keys: redis: %s kept changing under %d attempts", s.key, maxAttempts)
}
