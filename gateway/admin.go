package gateway

import (
	"crypto/subtle"
	"io"
	"net/http"
	"net/http/pprof"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// The admin listener's routes: health and readiness for load balancers,
// and, behind the admin token, metrics, the operator's state view and
// pprof. Model administration is in modeladmin.go, the Host and Origin
// checks in adminguard.go.

func (g *Gateway) adminRoutes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !g.catalog.Ready() {
			http.Error(w, "no model worker is ready", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	})
	mux.Handle("GET /metrics", g.adminAuth(promhttp.HandlerFor(g.cfg.Registry, promhttp.HandlerOpts{})))
	mux.Handle("GET /debug/state", g.adminAuth(http.HandlerFunc(g.serveState)))
	mux.Handle("/debug/pprof/", g.adminAuth(http.HandlerFunc(pprof.Index)))
	mux.Handle("/debug/pprof/cmdline", g.adminAuth(http.HandlerFunc(pprof.Cmdline)))
	mux.Handle("/debug/pprof/profile", g.adminAuth(http.HandlerFunc(pprof.Profile)))
	mux.Handle("/debug/pprof/symbol", g.adminAuth(http.HandlerFunc(pprof.Symbol)))
	mux.Handle("/debug/pprof/trace", g.adminAuth(http.HandlerFunc(pprof.Trace)))
	if g.cfg.ModelAdmin != nil {
		g.modelAdminRoutes(mux)
	}
	guard := newAdminGuard(g.cfg.Admin, g.admin, g.cfg.AdminHosts, func(reason string) {
		g.metrics.adminRefusals.WithLabelValues(reason).Inc()
	})
	return guard.wrap(mux)
}

// adminAuth demands the admin token when one is configured. Health and
// readiness stay open so that load balancers need no secret.
func (g *Gateway) adminAuth(next http.Handler) http.Handler {
	if g.cfg.AdminToken == "" {
		return next
	}
	want := []byte("Bearer " + g.cfg.AdminToken)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) != 1 {
			g.metrics.adminRefusals.WithLabelValues("token").Inc()
			writeError(w, errAdminToken)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// serveState is the operator's JSON view: models, readiness, each kind of
// backend's state under its own key ("workers", "upstreams"), and
// whatever Config.Status reports about queues.
func (g *Gateway) serveState(w http.ResponseWriter, r *http.Request) {
	state := map[string]any{}
	for kind, s := range g.catalog.BackendStates() {
		state[kind] = s
	}
	if state["workers"] == nil {
		state["workers"] = []struct{}{}
	}
	state["ready"], state["models"] = g.catalog.Ready(), g.catalog.Models()
	if g.cfg.Status != nil {
		state["status"] = g.cfg.Status()
	}
	writeJSON(w, state)
}
