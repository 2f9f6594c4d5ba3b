package tlsbind

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"h3infer/config"
)

func testRing(t testing.TB) *KeyRing {
	t.Helper()
	r, err := EnsureKeyRing(t.TempDir()+"/keys.json", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func claims(now time.Time) Claims {
	return Claims{Tenant: "t", Audience: DefaultAudience, IssuedAt: now.Unix(), NotBefore: now.Unix() - 1, Expires: now.Add(time.Hour).Unix()}
}

func TestVerify(t *testing.T) {
	ring := testRing(t)
	v, err := NewVerifier(ring, "")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	issue := func(c Claims) string {
		cred, err := ring.Issue(c)
		if err != nil {
			t.Fatal(err)
		}
		b, _, err := SplitCredential(cred)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	good := issue(claims(now))
	expired := claims(now)
	expired.Expires = now.Add(-time.Second).Unix()
	early := claims(now)
	early.NotBefore = now.Add(time.Hour).Unix()
	aud := claims(now)
	aud.Audience = "other"
	other := testRing(t)
	foreignCred, _ := other.Issue(claims(now))
	foreign, _, _ := SplitCredential(foreignCred)
	f := strings.Split(good, ".")
	tampered := f[0] + "." + f[1] + "." + b64.EncodeToString([]byte(`{"sub":"admin","aud":"h3infer","exp":9999999999,"bind":"optional"}`)) + "." + f[3]
	cases := map[string]struct {
		token string
		want  error
	}{
		"valid":           {good, nil},
		"empty":           {"", ErrNoToken},
		"expired":         {issue(expired), ErrExpired},
		"not yet valid":   {issue(early), ErrNotYetValid},
		"wrong audience":  {issue(aud), ErrWrongAudience},
		"unknown key id":  {foreign, ErrUnknownKey},
		"tampered claims": {tampered, ErrBadSignature},
		"secret included": {good + ".AAAA", ErrSecretSent},
		"three fields":    {"h3t1.a.b", ErrMalformed},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			tok, err := v.Verify(tc.token)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if tc.want == nil && (tok.Tenant != "t" || len(tok.Secret) != sha256.Size) {
				t.Errorf("token %+v", tok)
			}
		})
	}
}

func TestSecretMatchesClient(t *testing.T) {
	ring := testRing(t)
	cred, _ := ring.Issue(claims(time.Now()))
	bearer, secret, err := SplitCredential(cred)
	if err != nil {
		t.Fatal(err)
	}
	v, _ := NewVerifier(ring, "")
	tok, err := v.Verify(bearer)
	if err != nil {
		t.Fatal(err)
	}
	if string(tok.Secret) != string(secret) {
		t.Error("the gateway derives a different secret from the one the client holds")
	}
}

func TestRotationKeepsOldKeyUntilItExpires(t *testing.T) {
	ring := testRing(t)
	now := time.Now()
	cred, _ := ring.Issue(claims(now))
	bearer, _, _ := SplitCredential(cred)
	if err := ring.Rotate(now, time.Hour); err != nil {
		t.Fatal(err)
	}
	v, _ := NewVerifier(ring, "")
	if _, err := v.Verify(bearer); err != nil {
		t.Fatalf("token signed by the previous key: %v", err)
	}
	v.now = func() time.Time { return now.Add(2 * time.Hour) }
	if _, err := v.Verify(bearer); !errors.Is(err, ErrUnknownKey) {
		t.Fatalf("after the old key's verify window: %v, want ErrUnknownKey", err)
	}
	fresh, _ := ring.Issue(claims(now))
	if !strings.Contains(fresh, "."+ring.Keys[0].ID+".") {
		t.Error("new tokens are not signed by the new key")
	}
}

func TestBindingProof(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	expA, expB := []byte("exporter-of-connection-A........"), []byte("exporter-of-connection-B........")
	p := BindingProof(secret, expA)
	if err := VerifyBinding(secret, expA, p); err != nil {
		t.Errorf("own connection: %v", err)
	}
	if err := VerifyBinding(secret, expB, p); !errors.Is(err, ErrBadBinding) {
		t.Errorf("other connection: %v, want ErrBadBinding", err)
	}
	if err := VerifyBinding(secret, expA, ""); !errors.Is(err, ErrNoBinding) {
		t.Errorf("no proof: %v, want ErrNoBinding", err)
	}
}

func TestReplayGuard(t *testing.T) {
	g, err := NewReplayGuard(NewMemoryStrikes(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	g.started = time.Now().Add(-time.Hour) // past the warm-up
	secret := []byte("0123456789abcdef0123456789abcdef")
	ctx := context.Background()
	body := []byte(`{"model":"demo"}`)
	p, _ := NewEarlyProof(secret, time.Now(), "POST", "/v1/chat/completions", body)
	if err := g.Check(ctx, secret, p, "POST", "/v1/chat/completions", body); err != nil {
		t.Fatalf("first use: %v", err)
	}
	if err := g.Check(ctx, secret, p, "POST", "/v1/chat/completions", body); !errors.Is(err, ErrReplayed) {
		t.Fatalf("second use: %v, want ErrReplayed", err)
	}
	p2, _ := NewEarlyProof(secret, time.Now(), "POST", "/v1/chat/completions", body)
	if err := g.Check(ctx, secret, p2, "POST", "/v1/chat/completions", []byte(`{"model":"other"}`)); !errors.Is(err, ErrBadProof) {
		t.Fatalf("other body: %v, want ErrBadProof", err)
	}
	stale, _ := NewEarlyProof(secret, time.Now().Add(-time.Minute), "POST", "/v1/chat/completions", body)
	if err := g.Check(ctx, secret, stale, "POST", "/v1/chat/completions", body); !errors.Is(err, ErrStaleProof) {
		t.Fatalf("stale: %v, want ErrStaleProof", err)
	}
}

func TestTicketDecisions(t *testing.T) {
	mem := NewMemoryStrikes()
	tk, err := NewTickets(TicketConfig{Instance: "a", Trusted: []string{"b"}, Strikes: mem, Window: config.Duration(time.Second), MaxEarlyAge: config.Duration(time.Hour)}, discard())
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tk.started = now.Add(-time.Minute)
	tk.now = func() time.Time { return now }
	mark := func(instance string, issued time.Time, id byte) [][]byte {
		other := &Tickets{cfg: TicketConfig{Instance: instance}}
		return [][]byte{[]byte("quic-go entry"), other.mark([16]byte{id}, issued)}
	}
	cases := []struct {
		name  string
		extra [][]byte
		want  string
	}{
		{"fresh own", mark("a", now, 1), TicketEarlyAllowed},
		{"used again", mark("a", now, 1), TicketReused},
		{"trusted peer", mark("b", now, 2), TicketEarlyAllowed},
		{"foreign", mark("c", now, 3), TicketForeign},
		{"too old", mark("a", now.Add(-2*time.Hour), 4), TicketTooOld},
		{"unmarked", [][]byte{[]byte("x")}, TicketUnmarked},
	}
	for _, tc := range cases {
		if got := tk.decide(tc.extra); got != tc.want {
			t.Errorf("%s: got %s, want %s", tc.name, got, tc.want)
		}
	}
	// A proof spent before a restart stays fresh for up to two windows.
	for _, age := range []time.Duration{0, time.Second, 2*time.Second - time.Millisecond} {
		tk.started = now.Add(-age)
		if got := tk.decide(mark("a", now, 9)); got != TicketWarmingUp {
			t.Errorf("%s after start with a memory register: got %s, want %s", age, got, TicketWarmingUp)
		}
	}
	tk.started = now.Add(-2 * time.Second)
	if got := tk.decide(mark("a", now, 9)); got != TicketEarlyAllowed {
		t.Errorf("two windows after start: got %s, want %s", got, TicketEarlyAllowed)
	}
}

// TestTicketsDefaultInstanceIsOwn: without a configured name every Tickets
// names itself, so two processes sharing ticket keys (or one process
// before and after a restart) decline each other's tickets for 0-RTT.
func TestTicketsDefaultInstanceIsOwn(t *testing.T) {
	newTickets := func() *Tickets {
		tk, err := NewTickets(TicketConfig{Strikes: NewMemoryStrikes(), Window: config.Duration(time.Second)}, discard())
		if err != nil {
			t.Fatal(err)
		}
		tk.started = time.Now().Add(-time.Minute)
		return tk
	}
	a, b := newTickets(), newTickets()
	if a.Instance() == "" || a.Instance() == b.Instance() {
		t.Fatalf("default instance names %q and %q, want two distinct names", a.Instance(), b.Instance())
	}
	ticket := [][]byte{a.mark([16]byte{1}, time.Now())}
	if got := b.decide(ticket); got != TicketForeign {
		t.Errorf("a's ticket at b: got %s, want %s", got, TicketForeign)
	}
	if got := a.decide(ticket); got != TicketEarlyAllowed {
		t.Errorf("a's ticket at a: got %s, want %s", got, TicketEarlyAllowed)
	}
}

// durableMemory is a MemoryStrikes that claims to outlive the process, as
// a shared register does.
type durableMemory struct{ *MemoryStrikes }

func (durableMemory) Durable() bool { return true }

// TestReplayGuardAfterRestart: a proof spent just before a restart, stamped
// as far ahead as the window allows, must not be accepted by the new
// process's empty memory register at any time; proofs are refused for two
// windows after start, and a fresh one is accepted after that.
func TestReplayGuardAfterRestart(t *testing.T) {
	const window = 10 * time.Second
	secret := []byte("0123456789abcdef0123456789abcdef")
	body := []byte(`{"model":"demo"}`)
	ctx := context.Background()
	restart := time.Now()
	guard := func(strikes StrikeRegister, started time.Time, now *time.Time) *ReplayGuard {
		g, err := NewReplayGuard(strikes, window)
		if err != nil {
			t.Fatal(err)
		}
		g.started = started
		g.now = func() time.Time { return *now }
		return g
	}
	check := func(g *ReplayGuard, p string) error {
		return g.Check(ctx, secret, p, "POST", "/v1/chat/completions", body)
	}

	now := restart.Add(-time.Millisecond)
	before := guard(NewMemoryStrikes(), restart.Add(-time.Hour), &now)
	spent, _ := NewEarlyProof(secret, now.Add(window-time.Millisecond), "POST", "/v1/chat/completions", body)
	if err := check(before, spent); err != nil {
		t.Fatalf("before the restart: %v", err)
	}

	after := guard(NewMemoryStrikes(), restart, &now)
	for _, at := range []time.Duration{0, 400 * time.Millisecond, window, 2*window - time.Millisecond} {
		now = restart.Add(at)
		if err := check(after, spent); !errors.Is(err, ErrWarmingUp) || !errors.Is(err, ErrStaleProof) {
			t.Errorf("the spent proof %s after the restart: %v, want ErrWarmingUp (an ErrStaleProof)", at, err)
		}
		fresh, _ := NewEarlyProof(secret, now, "POST", "/v1/chat/completions", body)
		if err := check(after, fresh); !errors.Is(err, ErrWarmingUp) {
			t.Errorf("a fresh proof %s after the restart: %v, want ErrWarmingUp", at, err)
		}
	}
	now = restart.Add(WarmUp(window))
	if err := check(after, spent); !errors.Is(err, ErrStaleProof) || errors.Is(err, ErrWarmingUp) {
		t.Errorf("the spent proof two windows after the restart: %v, want ErrStaleProof", err)
	}
	fresh, _ := NewEarlyProof(secret, now, "POST", "/v1/chat/completions", body)
	if err := check(after, fresh); err != nil {
		t.Errorf("a fresh proof two windows after the restart: %v, want it accepted", err)
	}

	// A register that outlives the process knows what was spent: no wait.
	now = restart
	shared := guard(durableMemory{NewMemoryStrikes()}, restart, &now)
	fresh, _ = NewEarlyProof(secret, now, "POST", "/v1/chat/completions", body)
	if err := check(shared, fresh); err != nil {
		t.Errorf("a fresh proof right after start with a durable register: %v, want it accepted", err)
	}
}

func FuzzParseEarlyProof(f *testing.F) {
	p, _ := NewEarlyProof([]byte("k"), time.UnixMilli(1700000000000), "POST", "/v1/completions", nil)
	for _, s := range []string{p, "", "e1...", "e1.AAAAAAAAAAAAAAAAAAAAAA.1.AAAA", "e1.x.-1.y", "e1.AAAAAAAAAAAAAAAAAAAAAB.01.AAAA"} {
		f.Add(s)
	}
	for _, s := range otherSpellings(p) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseEarlyProof(s)
		if err != nil {
			return
		}
		// A proof has one spelling: what parses prints back to itself.
		if p.String() != s {
			t.Fatalf("%q parsed to %+v, which prints as %q", s, p, p.String())
		}
	})
}

func FuzzVerifyToken(f *testing.F) {
	ring := &KeyRing{Keys: []SigningKey{{ID: "k1", Secret: make([]byte, 32)}}}
	cred, _ := ring.Issue(Claims{Tenant: "t", Audience: DefaultAudience, Expires: 4102444800})
	bearer, _, _ := SplitCredential(cred)
	for _, s := range append([]string{bearer, cred, "", "h3t1", "h3t1.k1..", "h3t1.k1.e30.AAAA"}, otherSpellings(bearer)...) {
		f.Add(s)
	}
	v, _ := NewVerifier(ring, "")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := v.Verify(s)
		if err == nil {
			// A token has one spelling: each field that verified
			// decodes and re-encodes to exactly what was sent.
			f := strings.Split(s, ".")
			claims, _ := b64.DecodeString(f[2])
			mac, _ := b64.DecodeString(f[3])
			if again := strings.Join([]string{f[0], f[1], b64.EncodeToString(claims), b64.EncodeToString(mac)}, "."); again != s {
				t.Fatalf("%q verified, but re-encodes to %q", s, again)
			}
			// And only the issued token verifies.
			if s != bearer {
				t.Fatalf("%q verified as %+v", s, tok.Claims)
			}
		}
		SplitCredential(s)
	})
}

// otherSpellings returns s with its last character replaced by every other
// base64url character that the lenient decoder maps to the same bytes:
// the character's unused low bits differ.
func otherSpellings(s string) []string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	i := strings.LastIndexByte(s, '.') + 1
	want, err := b64.DecodeString(s[i:])
	if err != nil {
		return nil
	}
	var out []string
	for _, c := range alphabet {
		other := s[:len(s)-1] + string(c)
		if other == s {
			continue
		}
		if got, err := b64.DecodeString(other[i:]); err == nil && string(got) == string(want) {
			out = append(out, other)
		}
	}
	return out
}

// TestOneSpelling: changing the last character of a token's MAC, a binding
// proof or an early proof to one that the lenient decoder reads as the
// same bytes is refused, while the original verifies.
func TestOneSpelling(t *testing.T) {
	ring := testRing(t)
	v, _ := NewVerifier(ring, "")
	cred, err := ring.Issue(claims(time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	bearer, secret, err := SplitCredential(cred)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(bearer); err != nil {
		t.Fatalf("the issued token: %v", err)
	}
	// An HMAC-SHA256 in unpadded base64url is 43 characters carrying 258
	// bits, so each MAC has 3 other lenient spellings.
	spellings := otherSpellings(bearer)
	if len(spellings) != 3 {
		t.Fatalf("%d other spellings of the MAC, want 3", len(spellings))
	}
	for _, s := range spellings {
		if _, err := v.Verify(s); !errors.Is(err, ErrMalformed) {
			t.Errorf("token with its MAC respelled: %v, want ErrMalformed", err)
		}
	}
	for _, s := range otherSpellings(cred) {
		if _, _, err := SplitCredential(s); !errors.Is(err, ErrMalformed) {
			t.Errorf("credential with its secret respelled: %v, want ErrMalformed", err)
		}
	}

	exp := []byte("exporter-of-connection-A........")
	binding := BindingProof(secret, exp)
	if err := VerifyBinding(secret, exp, binding); err != nil {
		t.Fatalf("binding proof: %v", err)
	}
	for _, s := range otherSpellings("." + binding) {
		if err := VerifyBinding(secret, exp, s[1:]); !errors.Is(err, ErrBadBinding) {
			t.Errorf("binding proof respelled: %v, want ErrBadBinding", err)
		}
	}

	g, err := NewReplayGuard(NewMemoryStrikes(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	g.started = time.Now().Add(-time.Hour) // past the warm-up
	body := []byte(`{"model":"demo"}`)
	proof, _ := NewEarlyProof(secret, time.Now(), "POST", "/v1/chat/completions", body)
	f := strings.Split(proof, ".")
	respelled := otherSpellings(proof)
	for _, n := range otherSpellings("." + f[1]) {
		respelled = append(respelled, strings.Join([]string{f[0], n[1:], f[2], f[3]}, "."))
	}
	respelled = append(respelled, strings.Join([]string{f[0], f[1], "0" + f[2], f[3]}, "."))
	for _, s := range respelled {
		if err := g.Check(context.Background(), secret, s, "POST", "/v1/chat/completions", body); !errors.Is(err, ErrBadProof) {
			t.Errorf("early proof respelled as %q: %v, want ErrBadProof", s, err)
		}
	}
	if err := g.Check(context.Background(), secret, proof, "POST", "/v1/chat/completions", body); err != nil {
		t.Errorf("the early proof itself: %v", err)
	}
}

func TestMemoryStrikesExpire(t *testing.T) {
	m := NewMemoryStrikes()
	now := time.Now()
	m.now = func() time.Time { return now }
	ctx := context.Background()
	if first, _ := m.Strike(ctx, "x", time.Second); !first {
		t.Fatal("first strike refused")
	}
	if first, _ := m.Strike(ctx, "x", time.Second); first {
		t.Fatal("second strike accepted")
	}
	now = now.Add(2 * time.Second)
	if first, _ := m.Strike(ctx, "x", time.Second); !first {
		t.Fatal("strike after expiry refused")
	}
}

// TestVerifyRemembersOnlyWhatStillHolds: a token verified once answers
// from the cache, but expiry, a replaced key and the bound on the cache
// are honoured exactly as by a full check.
func TestVerifyRemembersOnlyWhatStillHolds(t *testing.T) {
	ring := testRing(t)
	v, _ := NewVerifier(ring, "")
	now := time.Now()
	v.now = func() time.Time { return now }
	cred, _ := ring.Issue(claims(now))
	bearer, _, _ := SplitCredential(cred)
	first, err := v.Verify(bearer)
	if err != nil {
		t.Fatal(err)
	}
	if len(v.verified) != 1 {
		t.Fatalf("%d tokens remembered after one verified, want 1", len(v.verified))
	}
	first.Secret[0] ^= 0xff // callers own what they get
	first.Tenant = "changed"
	second, err := v.Verify(bearer)
	if err != nil || second.Tenant != "t" || second.Secret[0] == first.Secret[0] {
		t.Fatalf("second verify: %v, %+v: a caller's change leaked into the cache", err, second)
	}

	v.now = func() time.Time { return now.Add(2 * time.Hour) }
	if _, err := v.Verify(bearer); !errors.Is(err, ErrExpired) {
		t.Fatalf("after expiry: %v, want ErrExpired", err)
	}
	v.now = func() time.Time { return now }

	// The same key id with another secret: the remembered signature no
	// longer counts.
	ring.Keys[0].Secret = append([]byte(nil), ring.Keys[0].Secret...)
	ring.Keys[0].Secret[0] ^= 0xff
	if _, err := v.Verify(bearer); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("after the key's secret changed: %v, want ErrBadSignature", err)
	}

	// Forged tokens are never remembered; the cache stays bounded.
	f := strings.Split(bearer, ".")
	forged := f[0] + "." + f[1] + "." + f[2] + "." + b64.EncodeToString(make([]byte, sha256.Size))
	v.Verify(forged)
	if _, ok := v.verified[forged]; ok {
		t.Error("a token with a bad signature was remembered")
	}
	for i := range maxVerified + 10 {
		c := claims(now)
		c.Tenant = fmt.Sprint("t", i)
		cr, _ := ring.Issue(c)
		b, _, _ := SplitCredential(cr)
		if _, err := v.Verify(b); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(v.verified); n > maxVerified {
		t.Errorf("%d tokens remembered, bound is %d", n, maxVerified)
	}
}

// BenchmarkVerify: a token's first check against the same token again,
// in one run.
func BenchmarkVerify(b *testing.B) {
	ring := testRing(b)
	v, _ := NewVerifier(ring, "")
	cred, _ := ring.Issue(claims(time.Now()))
	bearer, _, _ := SplitCredential(cred)
	b.Run("first", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			clear(v.verified)
			if _, err := v.Verify(bearer); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("again", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := v.Verify(bearer); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestEarlyProofMethodCannotSlideIntoPath: the MAC writes the method's
// length in 16 bits, so a proof made for one (method, path) must not verify
// for another split of the same bytes with a method of 64 KiB or more.
func TestEarlyProofMethodCannotSlideIntoPath(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	long := strings.Repeat("M", 0x10000)
	if _, err := NewEarlyProof(secret, time.Now(), long+"X", "/p", nil); !errors.Is(err, ErrBadProof) {
		t.Errorf("proof for a %d-byte method: %v, want ErrBadProof", len(long)+1, err)
	}
	// With 16-bit lengths, ("", path) and (path[:64 KiB], path[64 KiB:])
	// write the same bytes under the same lengths once both paths are
	// 64 KiB or longer (the path's length saturates): the proof for the
	// first would verify for the second.
	path := "/" + strings.Repeat("p", 0x20000)
	h, err := NewEarlyProof(secret, time.Now(), "", path, nil)
	if err != nil {
		t.Fatal(err)
	}
	p, err := ParseEarlyProof(h)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Verify(secret, path[:0x10000], path[0x10000:], nil); !errors.Is(err, ErrBadProof) {
		t.Errorf("proof moved from the path into a 64 KiB method verified: %v", err)
	}
	if err := p.Verify(secret, "", path, nil); err != nil {
		t.Errorf("the proof's own request: %v", err)
	}
}
