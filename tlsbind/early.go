package tlsbind

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"time"
)

// EarlyPolicy says what the gateway does with a request that arrives
// before the handshake completes (0-RTT), or through an intermediary that
// marked it Early-Data: 1 (RFC 8470).
type EarlyPolicy string

const (
	// EarlyServe serves it at once: for safe reads.
	EarlyServe EarlyPolicy = "serve"
	// EarlyProofOrWait serves it at once when it carries a valid,
	// unused early proof, and otherwise waits for the handshake.
	EarlyProofOrWait EarlyPolicy = "proof"
	// EarlyWait holds it until the handshake completes.
	EarlyWait EarlyPolicy = "wait"
	// EarlyReject answers 425 Too Early.
	EarlyReject EarlyPolicy = "reject"
)

// ParseEarlyPolicy accepts the four policy names.
func ParseEarlyPolicy(s string) (EarlyPolicy, error) {
	switch p := EarlyPolicy(s); p {
	case EarlyServe, EarlyProofOrWait, EarlyWait, EarlyReject:
		return p, nil
	}
	return "", fmt.Errorf("want serve, proof, wait or reject, got %q", s)
}

// DefaultWindow is how far an early proof's time may be from the server's
// clock, and how long its nonce is remembered.
const DefaultWindow = 10 * time.Second

// Bounds of the window. Below MinWindow a client's clock skew alone
// turns proofs stale; above MaxWindow the strike register holds every
// nonce for minutes, and a restarted instance without a durable register
// refuses 0-RTT for twice as long (WarmUp).
const (
	MinWindow = 100 * time.Millisecond
	MaxWindow = 5 * time.Minute
)

// checkWindow applies the window's bounds, naming the key the
// configuration file writes it under.
func checkWindow(w time.Duration) error {
	if w < MinWindow || w > MaxWindow {
		return fmt.Errorf("zero_rtt.window: must be 100ms..5m, got %s", w)
	}
	return nil
}

// WarmUp is how long after start-up a register that is not durable
// refuses 0-RTT, tickets and early proofs alike, for a freshness window:
// twice the window. A proof is accepted while its stamp is within one
// window of the clock and may be stamped up to one window ahead, so one
// spent just before a restart stays acceptable for up to two windows after
// it, and only the register that died knew it was spent (RFC 8446
// section 8).
func WarmUp(window time.Duration) time.Duration { return 2 * window }

// ErrWarmingUp refuses early proofs while a register that is not durable
// is younger than WarmUp. It is an ErrStaleProof: the client retries after
// the handshake.
var ErrWarmingUp = fmt.Errorf("%w: this instance's strike register started too recently to know which proofs were spent", ErrStaleProof)

// ReplayGuard checks early proofs: MAC, freshness and single use.
type ReplayGuard struct {
	strikes StrikeRegister
	window  time.Duration
	started time.Time
	now     func() time.Time
}

// NewReplayGuard checks proofs within window (MinWindow..MaxWindow; 0
// means DefaultWindow) and records their nonces in strikes.
func NewReplayGuard(strikes StrikeRegister, window time.Duration) (*ReplayGuard, error) {
	if strikes == nil {
		return nil, errors.New("replay guard: strike register is nil")
	}
	if window == 0 {
		window = DefaultWindow
	}
	if err := checkWindow(window); err != nil {
		return nil, fmt.Errorf("replay guard: %w", err)
	}
	return &ReplayGuard{strikes: strikes, window: window, started: time.Now(), now: time.Now}, nil
}

// Window is the freshness window.
func (g *ReplayGuard) Window() time.Duration { return g.window }

// Check verifies an early proof header for a request and spends its nonce.
// Errors: ErrBadProof, ErrStaleProof (ErrWarmingUp among them),
// ErrReplayed, or a strike register failure (which must fail closed).
func (g *ReplayGuard) Check(ctx context.Context, secret []byte, header, method, path string, body []byte) error {
	p, err := ParseEarlyProof(header)
	if err != nil {
		return err
	}
	if err := p.Verify(secret, method, path, body); err != nil {
		return err
	}
	now := g.now()
	if !g.strikes.Durable() && now.Sub(g.started) < WarmUp(g.window) {
		return ErrWarmingUp
	}
	if d := now.Sub(p.Time); d > g.window || d < -g.window {
		return ErrStaleProof
	}
	// Remember the nonce for twice the window: a proof stamped up to one
	// window in the future stays valid that much longer.
	first, err := g.strikes.Strike(ctx, "proof:"+hex.EncodeToString(p.Nonce[:]), 2*g.window)
	if err != nil {
		return err
	}
	if !first {
		return ErrReplayed
	}
	return nil
}
