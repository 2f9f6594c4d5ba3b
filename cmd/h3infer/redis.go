package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"h3infer/certs"
)

// redisPingTimeout bounds the start-up check of each Redis client.
const redisPingTimeout = 5 * time.Second

// redisTarget says which address a use of Redis connects to, and the key
// that set it, for errors: the section's own redis_addr (zero_rtt or
// rate_limits, kept from before the shared section existed), else
// redis.url.
func redisTarget(cfg Config, section string) (key, addr string) {
	own := cfg.ZeroRTT.RedisAddr
	if section == "rate_limits" {
		own = cfg.RateLimits.RedisAddr
	}
	if own != "" {
		return section + ".redis_addr", own
	}
	return "redis.url", cfg.Redis.URL
}

// parseRedisAddr turns a configured address into client options: a
// redis://, rediss:// or unix:// URL (user, password and database in the
// URL, see redis.ParseURL), a path of a Unix socket, or host:port. Its
// errors never contain the address, which may hold a password.
func parseRedisAddr(addr string) (*redis.Options, error) {
	switch {
	case strings.Contains(addr, "://"):
		opts, err := redis.ParseURL(addr)
		if err != nil {
			// url.Parse's errors quote the whole URL, password included.
			if ue, ok := errors.AsType[*url.Error](err); ok {
				err = ue.Err
			}
			return nil, fmt.Errorf("want redis://, rediss:// or unix:// URL: %v", err)
		}
		return opts, nil
	case strings.HasPrefix(addr, "/"):
		return &redis.Options{Network: "unix", Addr: addr}, nil
	default:
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return nil, errors.New("want host:port, a Unix socket path, or a redis://, rediss:// or unix:// URL")
		}
		return &redis.Options{Addr: addr}, nil
	}
}

// redactRedisAddr is addr fit for logs and errors: a URL's password is
// replaced, and an address that does not parse is not shown at all.
func redactRedisAddr(addr string) string {
	if !strings.Contains(addr, "://") {
		return addr
	}
	u, err := url.Parse(addr)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Redacted()
}

// openRedis builds the client of one use of Redis (section "zero_rtt" or
// "rate_limits") and checks that it can log in and talk, so that a wrong
// password, an untrusted certificate or an unreachable server stops
// start-up with an error naming the key, instead of surfacing on the first
// request. Every use of Redis goes through here.
func openRedis(cfg Config, section string) (*redis.Client, error) {
	key, addr := redisTarget(cfg, section)
	opts, err := parseRedisAddr(addr)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	if opts.TLSConfig != nil && cfg.Redis.CAFile != "" {
		if opts.TLSConfig.RootCAs, err = certs.LoadPool(cfg.Redis.CAFile); err != nil {
			return nil, fmt.Errorf("redis.ca_file: %w", err)
		}
	}
	rc := redis.NewClient(opts)
	ctx, cancel := context.WithTimeout(context.Background(), redisPingTimeout)
	defer cancel()
	if err := rc.Ping(ctx).Err(); err != nil {
		rc.Close()
		return nil, fmt.Errorf("%s %s: %w", key, redactRedisAddr(addr), err)
	}
	return rc, nil
}

// validateRedis checks the addresses of the uses of Redis the config turns
// on, without connecting.
func (c Config) validateRedis(bad func(key, format string, a ...any)) {
	uses := map[string]string{} // section → why it needs Redis
	if c.ZeroRTT.StrikeRegister == "redis" {
		uses["zero_rtt"] = `strike_register "redis"`
	}
	if c.ZeroRTT.SessionKeysStore == "redis" {
		uses["zero_rtt"] = `session_keys_store "redis"`
	}
	if c.RateLimits.Store == "redis" {
		uses["rate_limits"] = `rate_limits.store "redis"`
	}
	anyTLS := false
	checked := map[string]bool{}
	for section, why := range uses {
		key, addr := redisTarget(c, section)
		checked[key] = true
		if addr == "" {
			bad(section+".redis_addr", "required with %s when redis.url is not set", why)
			continue
		}
		opts, err := parseRedisAddr(addr)
		if err != nil {
			bad(key, "%v", err)
			continue
		}
		anyTLS = anyTLS || opts.TLSConfig != nil
	}
	if c.Redis.URL != "" && !checked["redis.url"] {
		if _, err := parseRedisAddr(c.Redis.URL); err != nil {
			bad("redis.url", "%v", err)
		}
	}
	if c.Redis.CAFile != "" {
		if !anyTLS {
			bad("redis.ca_file", "set, but no Redis address in use is a rediss:// URL")
		} else if _, err := certs.LoadPool(c.Redis.CAFile); err != nil {
			bad("redis.ca_file", "%v", err)
		}
	}
}
