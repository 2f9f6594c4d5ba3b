package keysredis

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// SealKeySize is the length of a seal key: AES-256.
const SealKeySize = 32

// sealMagic starts every sealed value; it names the format, so that a
// later one can be told apart.
const sealMagic = "h3infer-sealed-v1:"

// ErrUnsealed means the Redis key holds a value this instance cannot open:
// sealed with another seal key, written in the clear (by an older h3infer,
// or by someone with write access to Redis), or damaged. The keys are
// never replaced in that case: other instances may depend on them.
var ErrUnsealed = errors.New("cannot be opened with this seal key")

// sealer seals the JSON of the session keys with AES-256-GCM. The
// associated data names the format and the Redis key, so that a value
// sealed for one key cannot be passed off as another's.
type sealer struct {
	aead cipher.AEAD
	ad   []byte
}

func newSealer(key []byte, redisKey string) (*sealer, error) {
	if len(key) != SealKeySize {
		return nil, fmt.Errorf("seal key: want %d bytes, got %d", SealKeySize, len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &sealer{aead: aead, ad: []byte(sealMagic + redisKey)}, nil
}

func (s *sealer) seal(plain []byte) ([]byte, error) {
	nonce := make([]byte, s.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	out := append([]byte(sealMagic), nonce...)
	return s.aead.Seal(out, nonce, plain, s.ad), nil
}

func (s *sealer) open(b []byte) ([]byte, error) {
	rest, ok := bytes.CutPrefix(b, []byte(sealMagic))
	if !ok {
		return nil, fmt.Errorf("%w: the value is not sealed", ErrUnsealed)
	}
	n := s.aead.NonceSize()
	if len(rest) < n+s.aead.Overhead() {
		return nil, fmt.Errorf("%w: the value is truncated", ErrUnsealed)
	}
	plain, err := s.aead.Open(nil, rest[:n], rest[n:], s.ad)
	if err != nil {
		return nil, fmt.Errorf("%w: it was sealed with another key, or altered", ErrUnsealed)
	}
	return plain, nil
}

// EnsureSealKey reads the seal key at path, or makes one and writes it
// (mode 0600) when the file does not exist. The file holds the key in
// base64 on one line. Instances that share session keys through Redis must
// share this file's content. A file readable by others is refused.
func EnsureSealKey(path string) ([]byte, error) {
	key, err := LoadSealKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return key, err
	}
	key = make([]byte, SealKeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		// Another process made it between our read and our create.
		return LoadSealKey(path)
	}
	if err != nil {
		return nil, err
	}
	_, err = f.WriteString(base64.StdEncoding.EncodeToString(key) + "\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	return key, nil
}

// LoadSealKey reads a seal key file written by EnsureSealKey (or by an
// operator: 32 random bytes in standard base64).
func LoadSealKey(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s: mode %v lets others read the seal key; want 0600 or stricter", path, fi.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	key, err := base64.StdEncoding.Strict().DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(key) != SealKeySize {
		return nil, fmt.Errorf("%s: want %d bytes in standard base64 on one line", path, SealKeySize)
	}
	return key, nil
}
