package tlsbind

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// FuzzVerifyBinding checks the connection-binding check against any header
// value, secret and exporter: the issued proof verifies on its own
// connection only, and a header that verifies carries the whole MAC, not a
// prefix or a look-alike. Seeds: the proofs below plus
// testdata/fuzz/FuzzVerifyBinding.
func FuzzVerifyBinding(f *testing.F) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	exporter := bytes.Repeat([]byte{7}, ExporterLen)
	proof := BindingProof(secret, exporter)
	for _, h := range []string{proof, proof[:len(proof)-1], proof + "A", "", "====", string(make([]byte, maxProofLen+1))} {
		f.Add(secret, exporter, h)
	}
	f.Fuzz(func(t *testing.T, secret, exporter []byte, header string) {
		proof := BindingProof(secret, exporter)
		if err := VerifyBinding(secret, exporter, proof); err != nil {
			t.Fatalf("issued proof refused: %v", err)
		}
		other := append(bytes.Clone(exporter), 0)
		if VerifyBinding(secret, other, proof) == nil {
			t.Fatal("proof verified on another connection's exporter")
		}
		err := VerifyBinding(secret, exporter, header)
		switch {
		case err == nil:
			got, derr := b64.DecodeString(header)
			want, _ := b64.DecodeString(proof)
			if derr != nil || !bytes.Equal(got, want) {
				t.Fatalf("header %q verified but decodes to %x, want the MAC %x", header, got, want)
			}
		case header == "" && !errors.Is(err, ErrNoBinding),
			header != "" && !errors.Is(err, ErrBadBinding):
			t.Fatalf("header %q: got %v", header, err)
		}
	})
}

// FuzzEarlyProofReplay spends one early proof and then offers the guard an
// arbitrary header for an arbitrary request: nothing may pass, since the
// only proof the fuzzer can make verify is a spelling of the spent one, and
// each spelling must map to the same strike. Seeds: respellings below.
func FuzzEarlyProofReplay(f *testing.F) {
	secret := []byte("fuzz-secret")
	issued := EarlyProof{Nonce: [nonceLen]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, Time: time.UnixMilli(1700000000000)}
	const method, path = "POST", "/v1/chat/completions"
	body := []byte(`{"model":"demo","messages":[{"role":"user","content":"hi"}]}`)
	copy(issued.MAC[:], issued.mac(secret, method, path, body))
	spent := issued.String()
	// A leading zero on the time and a changed last MAC character are
	// other spellings of the same proof.
	fields := strings.Split(spent, ".")
	zeroTime := strings.Join([]string{fields[0], fields[1], "0" + fields[2], fields[3]}, ".")
	for _, h := range []string{spent, spent[:len(spent)-1] + "B", zeroTime} {
		f.Add(h, method, path, body)
	}
	f.Fuzz(func(t *testing.T, header, m, p string, b []byte) {
		g, err := NewReplayGuard(NewMemoryStrikes(), 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		g.now = func() time.Time { return issued.Time }
		g.started = issued.Time.Add(-time.Hour) // past the warm-up
		ctx := context.Background()
		if err := g.Check(ctx, secret, spent, method, path, body); err != nil {
			t.Fatalf("issued proof refused: %v", err)
		}
		if err := g.Check(ctx, secret, header, m, p, b); err == nil {
			t.Fatalf("header %q for %s %q passed after the proof was spent", header, m, p)
		}
	})
}
