// Package tlsbind owns auth tokens, proofs bound to TLS exporter material,
// the 0-RTT policy and the anti-replay strike register.
//
// It must not import gateway.
package tlsbind
