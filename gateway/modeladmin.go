package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"
)

// VersionHeader pins a request to one loaded version of its model, and
// names in the response the version that served it.
const VersionHeader = "H3infer-Model-Version"

// modelAdminTimeout bounds one admin call; loading and warming up a large
// model is the slow part.
const modelAdminTimeout = 10 * time.Minute

// modelAction is the body of POST /admin/models/{model}.
type modelAction struct {
	// Action is load, unload, promote, canary or rollback.
	Action  string  `json:"action"`
	Version string  `json:"version"`
	Percent float64 `json:"percent"`
}

// modelAdminRoutes serves the model repository's admin API:
//
//	GET  /admin/models          every model's versions and routing
//	POST /admin/models/{model}  {"action": ..., "version": ..., "percent": ...}
//
// It answers with the new status, or an error as {"error": message}.
func (g *Gateway) modelAdminRoutes(mux *http.ServeMux) {
	mux.Handle("GET /admin/models", g.adminAuth(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeAdminJSON(w, http.StatusOK, g.cfg.ModelAdmin.ModelStatus())
	})))
	mux.Handle("POST /admin/models/{model}", g.adminAuth(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var a modelAction
		dec := json.NewDecoder(io.LimitReader(r.Body, 1<<16))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&a); err != nil {
			writeAdminJSON(w, http.StatusBadRequest, map[string]string{"error": "decode body: " + err.Error()})
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), modelAdminTimeout)
		defer cancel()
		model, adm := r.PathValue("model"), g.cfg.ModelAdmin
		var err error
		switch a.Action {
		case "load":
			err = adm.LoadVersion(ctx, model, a.Version)
		case "unload":
			err = adm.UnloadVersion(ctx, model, a.Version)
		case "promote":
			err = adm.Promote(ctx, model, a.Version)
		case "canary":
			err = adm.Canary(ctx, model, a.Version, a.Percent)
		case "rollback":
			err = adm.Rollback(ctx, model)
		default:
			writeAdminJSON(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("action: want load, unload, promote, canary or rollback, got %q", a.Action)})
			return
		}
		if err != nil {
			status := http.StatusConflict
			var nf interface{ NotFound() bool }
			if errors.As(err, &nf) && nf.NotFound() {
				status = http.StatusNotFound
			}
			g.log.Warn("model admin", "model", model, "action", a.Action, "version", a.Version, "err", err)
			writeAdminJSON(w, status, map[string]string{"error": err.Error()})
			return
		}
		g.log.Info("model admin", "model", model, "action", a.Action, "version", a.Version, "percent", a.Percent)
		writeAdminJSON(w, http.StatusOK, adm.ModelStatus())
	})))
}

func writeAdminJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
