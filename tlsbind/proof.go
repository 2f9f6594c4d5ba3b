package tlsbind

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Header names and the exporter label. The binding follows RFC 9266: the
// exporter with label "EXPORTER-Channel-Binding", no context, 32 bytes.
const (
	BindingHeader    = "H3infer-Binding"
	EarlyProofHeader = "H3infer-Early-Proof"
	ExporterLabel    = "EXPORTER-Channel-Binding"
	ExporterLen      = 32

	bindingLabel = "h3infer binding v1"
	earlyLabel   = "h3infer early request v1"
	earlyVersion = "e1"
	nonceLen     = 16
	maxProofLen  = 256
	// maxMethodLen keeps the method's length exact in the MAC's 16 bits.
	maxMethodLen = 0xffff
)

// Why a proof was refused.
var (
	ErrBadBinding = errors.New("connection binding proof does not match this connection")
	ErrNoBinding  = errors.New("token requires a connection binding proof")
	ErrBadProof   = errors.New("early request proof is malformed or does not match the request")
	ErrStaleProof = errors.New("early request proof is outside the freshness window")
	ErrReplayed   = errors.New("early request proof was already used")
)

// BindingProof is the header value that binds secret to the connection
// whose exporter value is exporter.
func BindingProof(secret, exporter []byte) string {
	return b64.EncodeToString(macOf(secret, []byte(bindingLabel), exporter))
}

// VerifyBinding checks a binding header against the server's own exporter
// value for the connection.
func VerifyBinding(secret, exporter []byte, header string) error {
	if header == "" {
		return ErrNoBinding
	}
	if len(header) > maxProofLen {
		return ErrBadBinding
	}
	got, err := decodeB64(header)
	if err != nil || !hmac.Equal(got, macOf(secret, []byte(bindingLabel), exporter)) {
		return ErrBadBinding
	}
	return nil
}

// EarlyProof is a single-use proof for one request sent in 0-RTT:
//
//	e1.<base64url 16-byte nonce>.<unix milliseconds>.<base64url HMAC-SHA256>
//
// The MAC, keyed by the token's secret, covers the nonce, the time, the
// method, the path and the SHA-256 of the body.
type EarlyProof struct {
	Nonce [nonceLen]byte
	Time  time.Time
	MAC   [sha256.Size]byte
}

// NewEarlyProof makes the header value for one request.
func NewEarlyProof(secret []byte, now time.Time, method, path string, body []byte) (string, error) {
	var p EarlyProof
	if len(method) > maxMethodLen {
		return "", fmt.Errorf("%w: method longer than %d bytes", ErrBadProof, maxMethodLen)
	}
	if _, err := rand.Read(p.Nonce[:]); err != nil {
		return "", err
	}
	p.Time = time.UnixMilli(now.UnixMilli())
	copy(p.MAC[:], p.mac(secret, method, path, body))
	return p.String(), nil
}

func (p *EarlyProof) mac(secret []byte, method, path string, body []byte) []byte {
	var ts [8]byte
	binary.BigEndian.PutUint64(ts[:], uint64(p.Time.UnixMilli()))
	bodyHash := sha256.Sum256(body)
	// Lengths keep method and path from sliding into each other. The
	// method's is exact (NewEarlyProof and Verify refuse longer ones); the
	// path's may saturate, since only the fixed-size body hash follows it.
	var lens [4]byte
	binary.BigEndian.PutUint16(lens[:2], uint16(len(method)))
	binary.BigEndian.PutUint16(lens[2:], uint16(min(len(path), 0xffff)))
	return macOf(secret, []byte(earlyLabel), p.Nonce[:], ts[:], lens[:], []byte(method), []byte(path), bodyHash[:])
}

func (p *EarlyProof) String() string {
	return earlyVersion + "." + b64.EncodeToString(p.Nonce[:]) + "." +
		strconv.FormatInt(p.Time.UnixMilli(), 10) + "." + b64.EncodeToString(p.MAC[:])
}

// ParseEarlyProof reads a header value. It checks form only.
func ParseEarlyProof(s string) (EarlyProof, error) {
	var p EarlyProof
	if len(s) > maxProofLen {
		return p, fmt.Errorf("%w: too long", ErrBadProof)
	}
	f := strings.Split(s, ".")
	if len(f) != 4 || f[0] != earlyVersion {
		return p, fmt.Errorf("%w: want %s.<nonce>.<unix ms>.<mac>", ErrBadProof, earlyVersion)
	}
	nonce, err := decodeB64(f[1])
	if err != nil || len(nonce) != nonceLen {
		return p, fmt.Errorf("%w: nonce", ErrBadProof)
	}
	// One spelling: no sign, no leading zeros.
	ms, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil || ms <= 0 || strconv.FormatInt(ms, 10) != f[2] {
		return p, fmt.Errorf("%w: time", ErrBadProof)
	}
	mac, err := decodeB64(f[3])
	if err != nil || len(mac) != sha256.Size {
		return p, fmt.Errorf("%w: mac", ErrBadProof)
	}
	copy(p.Nonce[:], nonce)
	p.Time = time.UnixMilli(ms)
	copy(p.MAC[:], mac)
	return p, nil
}

// Verify checks the MAC for this request.
func (p *EarlyProof) Verify(secret []byte, method, path string, body []byte) error {
	if len(method) > maxMethodLen {
		return ErrBadProof
	}
	if !hmac.Equal(p.MAC[:], p.mac(secret, method, path, body)) {
		return ErrBadProof
	}
	return nil
}
