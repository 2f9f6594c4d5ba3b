package gateway

import (
	"net/http"

	"h3infer/infer"
)

// The models endpoints, GET /v1/models and GET /v1/models/{model}: the
// models the workers serve, in OpenAI's model object shape.

type modelObject struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
	// MaxModelLen is the model's context in tokens, as vLLM names it, so
	// that a gateway in front of this one learns it; absent when unknown.
	MaxModelLen uint32 `json:"max_model_len,omitempty"`
	// Task is "embed" for an encoder, which serves /v1/embeddings and no
	// completions (model.json's task), so that a chat page or a client
	// can leave it out of a model picker; absent for a generative model.
	Task string `json:"task,omitempty"`
}

func (g *Gateway) modelObject(m infer.ModelInfo) modelObject {
	o := modelObject{ID: m.Name, Object: "model", Created: g.created, OwnedBy: "h3infer", MaxModelLen: m.ContextLength}
	if m.Encoder {
		o.Task = "embed"
	}
	return o
}

func (g *Gateway) serveModels(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeError(w, &methodNotAllowed{method: r.Method, allow: "GET, HEAD"})
		return
	}
	list := struct {
		Object string        `json:"object"`
		Data   []modelObject `json:"data"`
	}{Object: "list", Data: []modelObject{}}
	for _, m := range g.catalog.Models() {
		list.Data = append(list.Data, g.modelObject(m))
	}
	writeJSON(w, list)
}

func (g *Gateway) serveModel(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeError(w, &methodNotAllowed{method: r.Method, allow: "GET, HEAD"})
		return
	}
	name := r.PathValue("model")
	for _, m := range g.catalog.Models() {
		if m.Name == name {
			writeJSON(w, g.modelObject(m))
			return
		}
	}
	writeError(w, &unknownModel{model: name})
}
