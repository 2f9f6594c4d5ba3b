package ratelimit

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis keeps buckets in Redis so that every gateway instance pointed at the
// same server shares them. Each bucket is one key holding its theoretical
// arrival time (GCRA); a Lua script reads the server's clock and updates
// the key atomically, so instances need no synchronised clocks.
type Redis struct {
	client redis.UniversalClient
	prefix string
}

// NewRedis stores buckets under prefix (say "h3infer:rl:") through client.
func NewRedis(client redis.UniversalClient, prefix string) *Redis {
	return &Redis{client: client, prefix: prefix}
}

// gcra takes KEYS[1] = bucket key, ARGV = emission interval (µs per unit),
// burst, cost, force (0 or 1). It returns {ok, wait µs, remaining, reset µs}.
var gcra = redis.NewScript(`
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local force = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - interval * burst
if allow_at > now and force == 0 then
  local remaining = math.floor((now - (tat - interval * burst)) / interval)
  if remaining < 0 then remaining = 0 end
  return {0, allow_at - now, remaining, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
local wait = allow_at - now
if wait < 0 then wait = 0 end
local remaining = math.floor((now - allow_at) / interval)
if remaining < 0 then remaining = 0 end
return {1, wait, remaining, new_tat - now}
`)

// Take is Local.Take's contract, shared across instances.
func (r *Redis) Take(ctx context.Context, key string, lim Limit, cost int, force bool) (Decision, error) {
	if lim.Rate <= 0 || lim.Burst <= 0 {
		return Decision{}, fmt.Errorf("ratelimit: key %s: rate and burst must be > 0", key)
	}
	f := 0
	if force {
		f = 1
	}
	res, err := gcra.Run(ctx, r.client, []string{r.prefix + key}, interval(lim), lim.Burst, cost, f).Int64Slice()
	if err != nil {
		return Decision{}, fmt.Errorf("ratelimit: redis take %s: %w", key, err)
	}
	if len(res) != 4 {
		return Decision{}, fmt.Errorf("ratelimit: redis take %s: script returned %d values", key, len(res))
	}
	return Decision{
		OK:        res[0] == 1,
		Wait:      time.Duration(res[1]) * time.Microsecond,
		Remaining: int(res[2]),
		Reset:     time.Duration(res[3]) * time.Microsecond,
	}, nil
}

// giveBack takes KEYS[1] = bucket key, ARGV = emission interval (µs per
// unit), units. It moves the theoretical arrival time back by the units,
// but not before now: a bucket never holds more than its burst.
var giveBack = redis.NewScript(`
local interval = tonumber(ARGV[1])
local units = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local new_tat = tat - interval * units
if new_tat <= now then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
`)

// Refund is Local.Refund's contract, shared across instances.
func (r *Redis) Refund(ctx context.Context, key string, lim Limit, n int) error {
	if lim.Rate <= 0 || lim.Burst <= 0 {
		return fmt.Errorf("ratelimit: key %s: rate and burst must be > 0", key)
	}
	if n <= 0 {
		return nil
	}
	if err := giveBack.Run(ctx, r.client, []string{r.prefix + key}, interval(lim), n).Err(); err != nil {
		return fmt.Errorf("ratelimit: redis refund %s: %w", key, err)
	}
	return nil
}

// interval is lim's emission interval in µs, at least 1: the time one unit
// takes to come back.
func interval(lim Limit) int64 {
	return max(int64(float64(time.Second/time.Microsecond)/lim.Rate), 1)
}
