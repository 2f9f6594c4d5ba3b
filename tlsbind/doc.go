// Package tlsbind owns h3infer's auth tokens, the proofs that tie a token to
// one TLS connection (1-RTT) or to one request (0-RTT), the 0-RTT policy
// names, the anti-replay strike register and the session-ticket hooks that
// make 0-RTT tickets single-use.
//
// Tokens are a compact format of our own (see token.go) signed with HMAC
// keys that carry key IDs. Every token has a secret the holder keeps: the
// gateway derives it from the token and its signing key, so proofs keyed by
// it show that the sender holds more than the bearer string.
//
// It knows nothing of HTTP routing and must not import gateway.
package tlsbind
