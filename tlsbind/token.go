package tlsbind

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// Wire format. A token is four dot-separated fields:
//
//	h3t1.<key id>.<base64url claims JSON>.<base64url HMAC-SHA256>
//
// and the credential a client holds adds a fifth, the token's secret:
//
//	h3t1.<key id>.<claims>.<mac>.<base64url secret>
//
// Only the first four travel in Authorization; the secret keys proofs. The
// gateway derives the same secret from the MAC and the signing key, so it
// stores nothing per token.
const (
	tokenPrefix = "h3t1"
	// DefaultAudience is the audience tokens name unless configured.
	DefaultAudience = "h3infer"
	// maxTokenLen bounds what Verify will look at.
	maxTokenLen = 4096
	secretLabel = "h3infer token secret v1"
	keyIDLen    = 8
)

var b64 = base64.RawURLEncoding

// errNotCanonical: the field decodes, but is not how b64 spells its bytes.
var errNotCanonical = errors.New("not canonical base64url")

// decodeB64 decodes a base64url field of a token or proof, accepting only
// the one spelling b64 encodes its bytes to. The decoder alone lets the
// unused low bits of the last character vary and skips CR and LF, so one
// token would have several spellings that all verify.
func decodeB64(s string) ([]byte, error) {
	b, err := b64.DecodeString(s)
	if err != nil {
		return nil, err
	}
	if b64.EncodeToString(b) != s {
		return nil, errNotCanonical
	}
	return b, nil
}

// Bind says whether a token must be bound to the connection it is used on.
type Bind string

const (
	// BindOptional tokens serve clients that cannot compute TLS exporters
	// (browsers); a proof is checked when one is sent.
	BindOptional Bind = "optional"
	// BindRequired tokens are refused on 1-RTT requests without a valid
	// exporter-bound proof.
	BindRequired Bind = "required"
)

// Claims are what a token says about its holder.
type Claims struct {
	Tenant    string   `json:"sub"`
	Audience  string   `json:"aud"`
	Models    []string `json:"models,omitempty"` // empty: every model
	IssuedAt  int64    `json:"iat"`
	NotBefore int64    `json:"nbf"`
	Expires   int64    `json:"exp"`
	Bind      Bind     `json:"bind"`
	// UrgencyCeiling is the most urgent RFC 9218 urgency (lowest number)
	// the holder may ask for; nil means no limit.
	UrgencyCeiling *uint8 `json:"urg,omitempty"`
}

// AllowsModel reports whether the token may use model.
func (c *Claims) AllowsModel(model string) bool {
	return len(c.Models) == 0 || slices.Contains(c.Models, model)
}

// CapUrgency returns u, made no more urgent than the ceiling allows.
func (c *Claims) CapUrgency(u uint8) uint8 {
	if c.UrgencyCeiling != nil && u < *c.UrgencyCeiling {
		return *c.UrgencyCeiling
	}
	return u
}

// Token is a verified token.
type Token struct {
	Claims
	KeyID  string
	Secret []byte // keys binding and early proofs; never log it
}

// Why a token was refused. Callers branch on these with errors.Is.
var (
	ErrNoToken       = errors.New("no bearer token")
	ErrMalformed     = errors.New("malformed token")
	ErrUnknownKey    = errors.New("unknown signing key id")
	ErrBadSignature  = errors.New("bad token signature")
	ErrExpired       = errors.New("token expired")
	ErrNotYetValid   = errors.New("token not yet valid")
	ErrWrongAudience = errors.New("token is for another audience")
	ErrSecretSent    = errors.New("the token's secret was sent; send only the first four fields")
)

// SigningKey is one HMAC key. Keys are retired, not deleted, at rotation so
// that tokens signed before it keep verifying until VerifyUntil.
type SigningKey struct {
	ID      string    `json:"id"`
	Secret  []byte    `json:"secret"`
	Created time.Time `json:"created"`
	// VerifyUntil is zero for the current key; a retired key verifies
	// tokens until then (the longest token lifetime after retirement).
	VerifyUntil time.Time `json:"verify_until,omitzero"`
}

// KeyRing holds the signing keys; the first is the one that signs.
type KeyRing struct {
	Keys []SigningKey `json:"keys"`
}

func newSigningKey(now time.Time) (SigningKey, error) {
	k := SigningKey{Secret: make([]byte, 32), Created: now.UTC()}
	id := make([]byte, keyIDLen/2)
	if _, err := rand.Read(k.Secret); err != nil {
		return k, err
	}
	if _, err := rand.Read(id); err != nil {
		return k, err
	}
	k.ID = fmt.Sprintf("%x", id)
	return k, nil
}

// LoadKeyRing reads a key ring written by SaveKeyRing.
func LoadKeyRing(path string) (*KeyRing, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("token keys: %w", err)
	}
	var r KeyRing
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("token keys %s: %w", path, err)
	}
	if len(r.Keys) == 0 {
		return nil, fmt.Errorf("token keys %s: no keys", path)
	}
	for i, k := range r.Keys {
		if len(k.Secret) < 32 || k.ID == "" || strings.ContainsAny(k.ID, ".") {
			return nil, fmt.Errorf("token keys %s: key %d: want an id without dots and a 32-byte secret", path, i)
		}
	}
	return &r, nil
}

// EnsureKeyRing loads the key ring at path, creating one with a fresh key
// when the file does not exist.
func EnsureKeyRing(path string, now time.Time) (*KeyRing, error) {
	r, err := LoadKeyRing(path)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		return r, err
	}
	k, err := newSigningKey(now)
	if err != nil {
		return nil, err
	}
	r = &KeyRing{Keys: []SigningKey{k}}
	return r, r.Save(path)
}

// Save writes the ring readable by its owner only, atomically.
func (r *KeyRing) Save(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("token keys: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("token keys: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("token keys: %w", err)
	}
	return nil
}

// Rotate puts a fresh signing key first. The old current key keeps
// verifying for keep (the longest lifetime of a token it signed); keys
// whose VerifyUntil has passed are dropped.
func (r *KeyRing) Rotate(now time.Time, keep time.Duration) error {
	k, err := newSigningKey(now)
	if err != nil {
		return err
	}
	kept := []SigningKey{k}
	for i, old := range r.Keys {
		if i == 0 {
			old.VerifyUntil = now.Add(keep).UTC()
		}
		if now.Before(old.VerifyUntil) {
			kept = append(kept, old)
		}
	}
	r.Keys = kept
	return nil
}

func (r *KeyRing) find(id string, now time.Time) *SigningKey {
	for i := range r.Keys {
		k := &r.Keys[i]
		if k.ID == id && (i == 0 || now.Before(k.VerifyUntil)) {
			return k
		}
	}
	return nil
}

// Issue signs claims with the current key and returns the credential: the
// token with its secret appended.
func (r *KeyRing) Issue(c Claims) (string, error) {
	if len(r.Keys) == 0 {
		return "", errors.New("issue token: no signing key")
	}
	if c.Tenant == "" {
		return "", errors.New("issue token: tenant is empty")
	}
	if c.Bind == "" {
		c.Bind = BindOptional
	}
	if c.Bind != BindOptional && c.Bind != BindRequired {
		return "", fmt.Errorf("issue token: bind must be optional or required, got %q", c.Bind)
	}
	k := &r.Keys[0]
	payload, err := json.Marshal(c)
	if err != nil {
		return "", err
	}
	signed := tokenPrefix + "." + k.ID + "." + b64.EncodeToString(payload)
	mac := macOf(k.Secret, []byte(signed))
	return signed + "." + b64.EncodeToString(mac) + "." + b64.EncodeToString(secretOf(k.Secret, mac)), nil
}

func macOf(key []byte, parts ...[]byte) []byte {
	h := hmac.New(sha256.New, key)
	for _, p := range parts {
		h.Write(p)
	}
	return h.Sum(nil)
}

func secretOf(key, mac []byte) []byte {
	return macOf(key, []byte(secretLabel), mac)
}

// SplitCredential separates a credential into the bearer token sent in
// Authorization and the secret the client keeps.
func SplitCredential(cred string) (bearer string, secret []byte, err error) {
	cred = strings.TrimSpace(cred)
	i := strings.LastIndexByte(cred, '.')
	if i < 0 || strings.Count(cred, ".") != 4 {
		return "", nil, fmt.Errorf("credential: want five dot-separated fields: %w", ErrMalformed)
	}
	secret, err = decodeB64(cred[i+1:])
	if err != nil || len(secret) != sha256.Size {
		return "", nil, fmt.Errorf("credential secret: %w", ErrMalformed)
	}
	return cred[:i], secret, nil
}

// Verifier checks tokens against a key ring and an audience.
type Verifier struct {
	ring     *KeyRing
	audience string
	now      func() time.Time

	// verified remembers what checking a token's signature and decoding
	// its claims found, by the exact token string, so that a client
	// sending the same token on every request pays for the HMACs and the
	// JSON once. Each use still checks the key (present, unretired, the
	// same secret), the audience and the validity period afresh, so a hit
	// answers exactly as a full check would. Only tokens whose signature
	// verified get in, so the map holds what the key's owner issued; it is
	// emptied when it reaches maxVerified entries.
	mu       sync.Mutex
	verified map[string]*verifiedToken
}

// verifiedToken is a token whose signature checked out under key.
type verifiedToken struct {
	claims Claims
	keyID  string
	key    []byte // the signing key's secret it verified under
	secret []byte
}

// maxVerified bounds Verifier.verified.
const maxVerified = 4096

// NewVerifier checks tokens signed by ring's keys for audience (default
// DefaultAudience).
func NewVerifier(ring *KeyRing, audience string) (*Verifier, error) {
	if ring == nil || len(ring.Keys) == 0 {
		return nil, errors.New("token verifier: no signing keys")
	}
	if audience == "" {
		audience = DefaultAudience
	}
	return &Verifier{ring: ring, audience: audience, now: time.Now, verified: map[string]*verifiedToken{}}, nil
}

// parsedToken is a token's fields before any check.
type parsedToken struct {
	keyID  string
	signed string // prefix, key id and claims: what the MAC covers
	claims []byte
	mac    []byte
}

// parseToken splits a bearer token. It checks form only.
func parseToken(s string) (parsedToken, error) {
	var p parsedToken
	if len(s) > maxTokenLen {
		return p, fmt.Errorf("%w: longer than %d bytes", ErrMalformed, maxTokenLen)
	}
	f := strings.Split(s, ".")
	switch {
	case len(f) == 5:
		return p, ErrSecretSent
	case len(f) != 4 || f[0] != tokenPrefix:
		return p, fmt.Errorf("%w: want %s.<key id>.<claims>.<mac>", ErrMalformed, tokenPrefix)
	case f[1] == "":
		return p, fmt.Errorf("%w: empty key id", ErrMalformed)
	}
	claims, err := decodeB64(f[2])
	if err != nil {
		return p, fmt.Errorf("%w: claims: %v", ErrMalformed, err)
	}
	mac, err := decodeB64(f[3])
	if err != nil || len(mac) != sha256.Size {
		return p, fmt.Errorf("%w: signature is not a base64url HMAC-SHA256", ErrMalformed)
	}
	return parsedToken{keyID: f[1], signed: s[:len(s)-len(f[3])-1], claims: claims, mac: mac}, nil
}

// Verify checks a bearer token's form, key id, signature, audience and
// validity period, and returns it with its derived secret.
func (v *Verifier) Verify(bearer string) (*Token, error) {
	if bearer == "" {
		return nil, ErrNoToken
	}
	now := v.now()
	v.mu.Lock()
	vt := v.verified[bearer]
	v.mu.Unlock()
	if vt != nil {
		// The key must still verify tokens now, with the same secret.
		if k := v.ring.find(vt.keyID, now); k == nil || !bytes.Equal(k.Secret, vt.key) {
			vt = nil
		}
	}
	if vt == nil {
		var err error
		if vt, err = v.verify(bearer, now); err != nil {
			return nil, err
		}
		v.mu.Lock()
		if len(v.verified) >= maxVerified {
			clear(v.verified)
		}
		v.verified[bearer] = vt
		v.mu.Unlock()
	}
	c := vt.claims
	switch {
	case c.Audience != v.audience:
		return nil, fmt.Errorf("%w %q", ErrWrongAudience, c.Audience)
	case now.Unix() >= c.Expires:
		return nil, ErrExpired
	case now.Unix() < c.NotBefore:
		return nil, ErrNotYetValid
	case c.Tenant == "" || (c.Bind != BindOptional && c.Bind != BindRequired):
		return nil, fmt.Errorf("%w: claims lack a tenant or a bind mode", ErrMalformed)
	}
	// A copy each time: callers own what they get.
	c.Models = slices.Clone(c.Models)
	if c.UrgencyCeiling != nil {
		u := *c.UrgencyCeiling
		c.UrgencyCeiling = &u
	}
	return &Token{Claims: c, KeyID: vt.keyID, Secret: slices.Clone(vt.secret)}, nil
}

// verify does the costly part of Verify: the form, the key id, the
// signature and the claims' encoding.
func (v *Verifier) verify(bearer string, now time.Time) (*verifiedToken, error) {
	p, err := parseToken(bearer)
	if err != nil {
		return nil, err
	}
	k := v.ring.find(p.keyID, now)
	if k == nil {
		return nil, fmt.Errorf("%w %q", ErrUnknownKey, p.keyID)
	}
	if !hmac.Equal(macOf(k.Secret, []byte(p.signed)), p.mac) {
		return nil, ErrBadSignature
	}
	var c Claims
	if err := json.Unmarshal(p.claims, &c); err != nil {
		return nil, fmt.Errorf("%w: claims: %v", ErrMalformed, err)
	}
	return &verifiedToken{claims: c, keyID: k.ID, key: slices.Clone(k.Secret), secret: secretOf(k.Secret, p.mac)}, nil
}
