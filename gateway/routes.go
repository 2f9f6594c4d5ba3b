package gateway

import (
	"encoding/json"
	"fmt"
	"net/http"
)

// The API's routes: the token-guarded route table that both the mux and
// the 0-RTT configuration read, the mux served over HTTP/3 and TCP, and the
// JSON answer its handlers share.

// apiRoute is one token-guarded route: path names it in
// AuthConfig.EarlyData (zero_rtt.routes), pattern is what the mux matches.
type apiRoute struct {
	path, pattern string
	serve         func(*Gateway, http.ResponseWriter, *http.Request)
}

// apiRouteTable is the token-guarded API. routes serves it and
// EarlyDataRoutes names it, so the two cannot drift apart.
func apiRouteTable() []apiRoute {
	return []apiRoute{
		{"/v1/chat/completions", "/v1/chat/completions", func(g *Gateway, w http.ResponseWriter, r *http.Request) {
			g.serveCompletion(w, r, kindChat)
		}},
		{"/v1/completions", "/v1/completions", func(g *Gateway, w http.ResponseWriter, r *http.Request) {
			g.serveCompletion(w, r, kindText)
		}},
		{"/v1/embeddings", "/v1/embeddings", (*Gateway).serveEmbeddings},
		{"/v1/models", "/v1/models", (*Gateway).serveModels},
		{"/v1/models/", "/v1/models/{model...}", (*Gateway).serveModel},
		{"/tokenize", "/tokenize", (*Gateway).serveTokenize},
		{"/detokenize", "/detokenize", (*Gateway).serveDetokenize},
	}
}

// EarlyDataRoutes lists the route paths AuthConfig.EarlyData may name,
// in the order the API serves them.
func EarlyDataRoutes() []string {
	var paths []string
	for _, rt := range apiRouteTable() {
		paths = append(paths, rt.path)
	}
	return paths
}

// routes is the API and the chat page, served identically over HTTP/3 and
// TCP.
func (g *Gateway) routes() (http.Handler, error) {
	mux := http.NewServeMux()
	if err := routePage(mux); err != nil {
		return nil, err
	}
	for _, rt := range apiRouteTable() {
		mux.HandleFunc(rt.pattern, g.guard(rt.path, func(w http.ResponseWriter, r *http.Request) {
			rt.serve(g, w, r)
		}))
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errRouteNotFound)
	})
	return mux, nil
}

func writeJSON(w http.ResponseWriter, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, fmt.Errorf("encode response: %w", err))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(append(b, '\n'))
}
