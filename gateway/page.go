package gateway

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io/fs"
	"net/http"
	"time"

	"h3infer/web"
)

// setPageHeaders holds the chat page to its own origin: its scripts and
// fetches come from the gateway itself and nothing else.
func setPageHeaders(h http.Header) {
	h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	// Revalidate every load (a cheap 304 by ETag) so that a new binary's page
	// is never mixed with an old one's script.
	h.Set("Cache-Control", "no-cache")
}

// routePage serves the chat page at "/" and its assets beside it. Any other
// path still falls through to the API's 404.
func routePage(mux *http.ServeMux) error {
	files := web.FS()
	entries, err := fs.ReadDir(files, ".")
	if err != nil {
		return fmt.Errorf("gateway: chat page: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		b, err := fs.ReadFile(files, name)
		if err != nil {
			return fmt.Errorf("gateway: chat page: %w", err)
		}
		sum := sha256.Sum256(b)
		h := staticFile(name, b, `"`+base64.RawURLEncoding.EncodeToString(sum[:12])+`"`)
		if name == web.Index {
			mux.Handle("GET /{$}", h)
			continue
		}
		mux.Handle("GET /"+name, h)
	}
	return nil
}

// staticFile serves b with an ETag; http.ServeContent answers conditional
// and range requests and picks the Content-Type from the name.
func staticFile(name string, b []byte, etag string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		setPageHeaders(w.Header())
		w.Header().Set("ETag", etag)
		http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(b))
	})
}
