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

// Store is a certs.KeyStore on one Redis key holding the keys as JSON,
// sealed with AES-256-GCM under a key that never goes to Redis: whoever can
// read Redis cannot decrypt tickets or forge resets with what is there, and
// whoever can write it cannot make an instance adopt keys of their own (an
// instance refuses a value it cannot open, see ErrUnsealed). Creation and
// rotation run in WATCH/MULTI transactions, so when several instances are
// due at once one rotates and the others read its result.
type Store struct {
	client *redis.Client
	key    string
	seal   *sealer
}

var _ certs.KeyStore = (*Store)(nil)

// New uses client and key (DefaultKey when empty), sealing with sealKey
// (SealKeySize bytes; see EnsureSealKey).
func New(client *redis.Client, key string, sealKey []byte) (*Store, error) {
	if key == "" {
		key = DefaultKey
	}
	s, err := newSealer(sealKey, key)
	if err != nil {
		return nil, fmt.Errorf("session keys: %w", err)
	}
	return &Store{client: client, key: key, seal: s}, nil
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
			plain, err := s.seal.open(b)
			if err != nil {
				return fmt.Errorf("redis key %s: %w", s.key, err)
			}
			k = new(certs.SessionKeys)
			if err := json.Unmarshal(plain, k); err != nil {
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
		plain, err := json.Marshal(k)
		if err != nil {
			return err
		}
		nb, err := s.seal.seal(plain)
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
