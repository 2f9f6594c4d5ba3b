package gateway

import (
	"encoding/json"
	"io"
	"io/fs"
	"net/http"
	"strings"
	"testing"

	"h3infer/web"
)

func TestChatPage(t *testing.T) {
	h := newHarness(t, nil)
	want := map[string]string{
		"/":            "text/html; charset=utf-8",
		"/chat.js":     "text/javascript; charset=utf-8",
		"/chat.css":    "text/css; charset=utf-8",
		"/favicon.svg": "image/svg+xml",
	}
	for _, proto := range []string{"h3", "h2", "http/1.1"} {
		for path, ctype := range want {
			t.Run(proto+path, func(t *testing.T) {
				req, _ := http.NewRequest(http.MethodGet, h.base+path, nil)
				resp := h.do(t, proto, req)
				body, _ := io.ReadAll(resp.Body)
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("status %s: %s", resp.Status, body)
				}
				if got := resp.Header.Get("Content-Type"); got != ctype {
					t.Errorf("Content-Type %q, want %q", got, ctype)
				}
				if got := resp.Header.Get("Content-Security-Policy"); !strings.Contains(got, "default-src 'self'") {
					t.Errorf("Content-Security-Policy %q, want default-src 'self'", got)
				}
				name := strings.TrimPrefix(path, "/")
				if name == "" {
					name = web.Index
				}
				file, _ := fs.ReadFile(web.FS(), name)
				if string(body) != string(file) {
					t.Errorf("body of %s differs from the embedded %s", path, name)
				}

				// A reload revalidates and costs no body.
				etag := resp.Header.Get("ETag")
				req, _ = http.NewRequest(http.MethodGet, h.base+path, nil)
				req.Header.Set("If-None-Match", etag)
				if resp := h.do(t, proto, req); etag == "" || resp.StatusCode != http.StatusNotModified {
					t.Errorf("revalidation with ETag %q: status %d, want 304", etag, resp.StatusCode)
				}
			})
		}
	}
}

// The page must not swallow the API's answers for other paths.
func TestChatPageLeavesOtherPathsAlone(t *testing.T) {
	h := newHarness(t, nil)
	for _, path := range []string{"/index.html", "/nowhere", "/chat.js/x"} {
		req, _ := http.NewRequest(http.MethodGet, h.base+path, nil)
		resp := h.do(t, "h3", req)
		var e struct {
			Error struct {
				Code string `json:"code"`
			} `json:"error"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&e); err != nil || resp.StatusCode != http.StatusNotFound || e.Error.Code != "not_found" {
			t.Errorf("GET %s: status %d, error code %q (%v); want the API's 404", path, resp.StatusCode, e.Error.Code, err)
		}
	}
	resp := h.post(t, "h3", "/", "{}")
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("POST /: status %d, want 404", resp.StatusCode)
	}
}
