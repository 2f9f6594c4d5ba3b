package gateway

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"h3infer/infer"
	"h3infer/priority"
)

// The embeddings route, POST /v1/embeddings: an encoder model's vectors
// for one input or many, in OpenAI's request and response shapes. It
// takes the completions' steps (admit under the tenant's limits, route to
// a version, submit to the scheduler) and answers with one JSON object
// once the worker has sent every vector.

// embeddingRequest is OpenAI's embeddings request body. A field it does
// not name is refused with a 400 naming it.
type embeddingRequest struct {
	Model string `json:"model"`
	// Input is a string, an array of strings, an array of token ids or an
	// array of arrays of token ids.
	Input          json.RawMessage `json:"input"`
	EncodingFormat *string         `json:"encoding_format"`
	Dimensions     *int64          `json:"dimensions"`
	// User is OpenAI's end-user id; h3infer keys sticky canary splits by it.
	User string `json:"user"`
}

// Encoding formats of the vectors in the answer.
const (
	encodingFloat  = "float"
	encodingBase64 = "base64" // little-endian float32 bytes, standard base64
)

// embedding is a validated embeddings request.
type embedding struct {
	model  string
	user   string
	base64 bool
	req    infer.EmbedRequest
}

// parseEmbedding decodes and checks an embeddings request body. Every
// refusal names the parameter at fault. What only the model can check
// (context length, token ids against the vocabulary, dimensions against
// the vectors' length when the catalog does not know it) the worker
// checks.
func parseEmbedding(body []byte) (*embedding, error) {
	var req embeddingRequest
	if err := decodeBody(body, &req); err != nil {
		return nil, err
	}
	if req.Model == "" {
		return nil, invalidf("model", "model: required")
	}
	e := &embedding{model: req.Model, user: req.User}
	if f := req.EncodingFormat; f != nil {
		switch *f {
		case encodingFloat:
		case encodingBase64:
			e.base64 = true
		default:
			return nil, invalidf("encoding_format", "encoding_format: must be %q or %q, got %q", encodingFloat, encodingBase64, *f)
		}
	}
	if d := req.Dimensions; d != nil {
		if *d < 1 || *d > math.MaxUint32 {
			return nil, invalidf("dimensions", "dimensions: must be a positive integer, got %d", *d)
		}
		e.req.Dimensions = uint32(*d)
	}
	if err := embedInput(req.Input, &e.req); err != nil {
		return nil, err
	}
	return e, nil
}

// embedInput reads input in any of OpenAI's four shapes into r, within
// infer's bounds: at most MaxEmbedInputs inputs, none empty, and at most
// MaxEmbedTokens token ids in all (texts are counted where they are
// tokenized).
func embedInput(raw json.RawMessage, r *infer.EmbedRequest) error {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return invalidf("input", "input: required")
	}
	const shapes = "a string, an array of strings, an array of token ids or an array of arrays of token ids"
	if raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return invalidf("input", "input: %v", err)
		}
		if s == "" {
			return invalidf("input", "input: must not be empty")
		}
		r.Texts = []string{s}
		return nil
	}
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return invalidf("input", "input: must be %s", shapes)
	}
	if len(items) == 0 {
		return invalidf("input", "input: must not be empty")
	}
	first := bytes.TrimSpace(items[0])
	if list := len(first) > 0 && (first[0] == '"' || first[0] == '['); list && len(items) > infer.MaxEmbedInputs {
		return invalidf("input", "input: at most %d inputs, got %d", infer.MaxEmbedInputs, len(items))
	}
	switch {
	case len(first) > 0 && first[0] == '"':
		r.Texts = make([]string, len(items))
		for i, it := range items {
			if err := json.Unmarshal(it, &r.Texts[i]); err != nil {
				return invalidf("input", "input[%d]: must be a string like the inputs before it", i)
			}
			if r.Texts[i] == "" {
				return invalidf("input", "input[%d]: must not be empty", i)
			}
		}
	case len(first) > 0 && first[0] == '[':
		r.Tokens = make([][]uint32, len(items))
		total := 0
		for i, it := range items {
			ids, err := tokenIDs(it, fmt.Sprintf("input[%d]", i))
			if err != nil {
				return err
			}
			if total += len(ids); total > infer.MaxEmbedTokens {
				return invalidf("input", "input: more than %d tokens in all", infer.MaxEmbedTokens)
			}
			r.Tokens[i] = ids
		}
	default:
		ids, err := tokenIDs(raw, "input")
		if err != nil {
			return err
		}
		if len(ids) > infer.MaxEmbedTokens {
			return invalidf("input", "input: more than %d tokens in all", infer.MaxEmbedTokens)
		}
		r.Tokens = [][]uint32{ids}
	}
	return nil
}

// tokenIDs reads one non-empty array of token ids.
func tokenIDs(raw json.RawMessage, param string) ([]uint32, error) {
	var ids []json.Number
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&ids); err != nil {
		return nil, invalidf("input", "%s: must be an array of token ids (non-negative integers)", param)
	}
	if len(ids) == 0 {
		return nil, invalidf("input", "%s: must not be empty", param)
	}
	out := make([]uint32, len(ids))
	for i, n := range ids {
		v, err := strconv.ParseUint(string(n), 10, 32)
		if err != nil {
			return nil, invalidf("input", "%s[%d]: token ids are non-negative integers, got %s", param, i, n)
		}
		out[i] = uint32(v)
	}
	return out, nil
}

// modelInfo is what the catalog says of model name, which checkModel has
// found.
func (g *Gateway) modelInfo(name string) (infer.ModelInfo, bool) {
	for _, m := range g.catalog.Models() {
		if m.Name == name {
			return m, true
		}
	}
	return infer.ModelInfo{}, false
}

// refuseEncoder refuses a completion for an encoder model.
func (g *Gateway) refuseEncoder(model string) error {
	if m, ok := g.modelInfo(model); ok && m.Encoder {
		return invalidf("model", "model: %q is an embedding model and generates no text; use /v1/embeddings", model)
	}
	return nil
}

// checkEncoder refuses embeddings from a model that is not an encoder, and
// dimensions the model does not allow.
func (g *Gateway) checkEncoder(e *embedding) error {
	m, _ := g.modelInfo(e.model)
	if !m.Encoder {
		return invalidf("model", "model: %q generates text and serves no embeddings; use /v1/chat/completions or /v1/completions", e.model)
	}
	if d := e.req.Dimensions; d != 0 {
		switch {
		case !m.Matryoshka:
			return invalidf("dimensions", "dimensions: model %q does not support shortening its vectors", e.model)
		case m.EmbeddingSize != 0 && d > m.EmbeddingSize:
			return invalidf("dimensions", "dimensions: %d is more than the %d values of model %q's vectors", d, m.EmbeddingSize, e.model)
		}
	}
	return nil
}

// serveEmbeddings answers POST /v1/embeddings.
func (g *Gateway) serveEmbeddings(w http.ResponseWriter, r *http.Request) {
	run := &inflight{start: time.Now()}
	e, err := g.parseEmbeddingRequest(w, r, run)
	if err != nil {
		writeError(w, err)
		return
	}
	ctx, end := g.lifetime(r, run)
	defer end()
	defer g.finished(ctx, run)

	// Embeddings reserve no output tokens: they make none. They count
	// against the tenant's request rate and concurrency.
	if err := g.admit(ctx, w, r, run); err != nil {
		writeError(w, err)
		return
	}
	defer func() { run.adm.release(ctx, 0) }()
	model, done, err := g.route(w, r, run)
	if err != nil {
		writeError(w, err)
		return
	}
	versionFailed := true
	defer func() { done(versionFailed) }()
	if err := g.submit(ctx, run, model); err != nil {
		writeError(w, err)
		return
	}
	defer run.dispatch.Close()

	vecs, usage, err := g.collectVectors(ctx, run, e.req.Len())
	if err != nil {
		err = deadlineCause(ctx, err)
		failed(ctx, err)
		writeError(w, embedFailure(err))
		return
	}
	versionFailed = false
	body, err := appendEmbeddings(nil, e, vecs, usage)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(body)
}

// parseEmbeddingRequest reads and checks the request into run, as
// parseRequest does a completion's.
func (g *Gateway) parseEmbeddingRequest(w http.ResponseWriter, r *http.Request, run *inflight) (*embedding, error) {
	if r.Method != http.MethodPost {
		return nil, &methodNotAllowed{method: r.Method, allow: http.MethodPost}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, g.cfg.MaxBodyBytes))
	if err != nil {
		if _, tooLarge := errors.AsType[*http.MaxBytesError](err); !tooLarge && r.Context().Err() == nil {
			err = invalidf("", "reading the request body: %v", err)
		}
		return nil, err
	}
	e, err := parseEmbedding(body)
	if err != nil {
		return nil, err
	}
	if err := g.checkModel(e.model); err != nil {
		return nil, err
	}
	if err := g.checkEncoder(e); err != nil {
		return nil, err
	}
	ceiling, err := identify(r.Context(), e.model)
	if err != nil {
		return nil, err
	}
	prio := priority.Parse(r.Header.Values("Priority"))
	deadline, err := g.deadlineOf(r.Header, run.start)
	if err != nil {
		return nil, err
	}
	run.req = &completion{kind: kindText, model: e.model, user: e.user, job: infer.Request{Model: e.model, Embed: &e.req}}
	run.deadline, run.prio, run.ceiling = deadline, prio, ceiling
	run.labels = [2]string{e.model, urgencyLabel(prio.Urgency)}
	run.last = run.start
	return e, nil
}

// collectVectors gathers the n vectors of the request's Embedding events,
// which must arrive in order, and its usage from Done.
func (g *Gateway) collectVectors(ctx context.Context, run *inflight, n int) ([][]float32, uint32, error) {
	vecs := make([][]float32, 0, n)
	for {
		ev, err := g.next(ctx, run)
		if err != nil {
			return nil, 0, err
		}
		switch {
		case ev.Done != nil:
			if len(vecs) != n {
				return nil, 0, fmt.Errorf("the worker ended after %d of %d vectors", len(vecs), n)
			}
			return vecs, ev.Done.PromptTokens, nil
		case ev.Embedding == nil:
			return nil, 0, errors.New("the worker answered an embedding request with tokens")
		case int(ev.Embedding.Index) != len(vecs) || len(vecs)+len(ev.Embedding.Vectors) > n:
			return nil, 0, fmt.Errorf("the worker sent vectors from %d on, after %d of %d", ev.Embedding.Index, len(vecs), n)
		}
		vecs = append(vecs, ev.Embedding.Vectors...)
	}
}

// embedFailure names the parameter of a worker's refusal of an embedding
// request: the input (its context length, a token id past the
// vocabulary), dimensions, or the model.
func embedFailure(err error) error {
	wf, ok := errors.AsType[*workerFailure](err)
	if !ok {
		return err
	}
	switch wf.err.Code {
	case infer.CodeContextLength:
		return &workerFailure{err: wf.err, promptParam: "input"}
	case infer.CodeInvalidRequest:
		param, _, _ := strings.Cut(wf.err.Message, ":")
		if !strings.HasPrefix(param, "input") && param != "dimensions" {
			param = "model"
		}
		return invalidf(param, "%s", wf.err.Message)
	}
	return err
}

// appendEmbeddings appends OpenAI's embeddings response: a list of one
// embedding object per input, its vector as JSON numbers (the shortest
// text that reads back as the same float32) or as base64 of its
// little-endian float32 bytes, and the usage. A value JSON cannot carry
// (NaN, an infinity) is an error of the model's.
func appendEmbeddings(b []byte, e *embedding, vecs [][]float32, promptTokens uint32) ([]byte, error) {
	b = append(b, `{"object":"list","data":[`...)
	var raw []byte
	for i, v := range vecs {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"object":"embedding","index":`...)
		b = strconv.AppendInt(b, int64(i), 10)
		b = append(b, `,"embedding":`...)
		if e.base64 {
			raw = raw[:0]
			for _, f := range v {
				raw = binary.LittleEndian.AppendUint32(raw, math.Float32bits(f))
			}
			b = append(b, '"')
			b = base64.StdEncoding.AppendEncode(b, raw)
			b = append(b, '"', '}')
			continue
		}
		b = append(b, '[')
		for k, f := range v {
			if math.IsNaN(float64(f)) || math.IsInf(float64(f), 0) {
				return nil, fmt.Errorf("the model's vector %d holds %v", i, f)
			}
			if k > 0 {
				b = append(b, ',')
			}
			b = strconv.AppendFloat(b, float64(f), 'g', -1, 32)
		}
		b = append(b, ']', '}')
	}
	b = append(b, `],"model":`...)
	name, err := json.Marshal(e.model)
	if err != nil {
		return nil, err
	}
	b = append(b, name...)
	b = append(b, `,"usage":{"prompt_tokens":`...)
	b = strconv.AppendUint(b, uint64(promptTokens), 10)
	b = append(b, `,"total_tokens":`...)
	b = strconv.AppendUint(b, uint64(promptTokens), 10)
	return append(b, "}}\n"...), nil
}
