package main

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"h3infer/gateway"
	"h3infer/tlsbind"
	"h3infer/tlsbind/strikeredis"
)

// authSetup builds the gateway's token verifier and 0-RTT guard, and
// returns the development credential (empty with auth disabled) and a
// function that releases what it opened. The session keys the 0-RTT tickets
// rely on are set up by sessionKeyStore.
func authSetup(cfg Config, reg prometheus.Registerer, log *slog.Logger) (gateway.AuthConfig, string, func(), error) {
	none := func() {}
	auth := gateway.AuthConfig{Disabled: cfg.Auth.Disabled, Disable0RTT: cfg.ZeroRTT.Disabled}
	if cfg.Auth.Disabled {
		return auth, "", none, nil
	}
	ring, err := tlsbind.EnsureKeyRing(cfg.Auth.KeysFile, time.Now())
	if err != nil {
		return auth, "", none, err
	}
	if auth.Tokens, err = tlsbind.NewVerifier(ring, cfg.Auth.Audience); err != nil {
		return auth, "", none, err
	}
	var dev string
	if cfg.Auth.Audience == tlsbind.DefaultAudience {
		if dev, err = ensureDevToken(cfg.StateDir, ring, auth.Tokens); err != nil {
			return auth, "", none, err
		}
	}

	var strikes tlsbind.StrikeRegister = tlsbind.NewMemoryStrikes()
	closeFn := none
	if cfg.ZeroRTT.StrikeRegister == "redis" {
		rc, err := openRedis(cfg, "zero_rtt")
		if err != nil {
			return auth, "", none, err
		}
		strikes = strikeredis.New(rc, "")
		closeFn = func() { rc.Close() }
	}
	window := time.Duration(cfg.ZeroRTT.Window)
	if auth.Replay, err = tlsbind.NewReplayGuard(strikes, window); err != nil {
		closeFn()
		return auth, "", none, err
	}
	tickets := cfg.ZeroRTT.TicketConfig
	tickets.Strikes, tickets.Registerer = strikes, reg
	auth.Tickets, err = tlsbind.NewTickets(tickets, log)
	if err != nil {
		closeFn()
		return auth, "", none, err
	}
	if !cfg.ZeroRTT.Disabled {
		log.Info("0-RTT tickets", "instance", auth.Tickets.Instance(), "trusted_instances", cfg.ZeroRTT.Trusted,
			"strike_register", cfg.ZeroRTT.StrikeRegister, "warm_up", tlsbind.WarmUp(window).String())
	}
	auth.EarlyData = cfg.ZeroRTT.Routes
	for _, s := range cfg.ZeroRTT.TrustedProxies {
		p, err := gateway.ParseTrustedProxy(s)
		if err != nil {
			closeFn()
			return auth, "", none, fmt.Errorf("zero_rtt.trusted_proxies: %w", err)
		}
		auth.TrustedProxies = append(auth.TrustedProxies, p)
	}
	return auth, dev, closeFn, nil
}
