package upstream

import (
	"encoding/base64"
	"encoding/binary"
	"io"
	"math"
	"net/http"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"

	"h3infer/infer"
)

func embedRequest(texts ...string) *infer.Request {
	return &infer.Request{Model: "m", Embed: &infer.EmbedRequest{Texts: texts}, Urgency: 3}
}

// An embedding request goes upstream as OpenAI's /v1/embeddings, floats
// asked for, and its vectors come back in input order, whatever order
// the upstream lists them in, then Done with the upstream's token count.
func TestEmbeddingsForwarded(t *testing.T) {
	f, url := newFake(t)
	s, _ := newTestSet(t, Options{}, testConfig("a", url))
	var body, path atomic.Value
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		body.Store(string(b))
		path.Store(r.URL.Path)
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"object":"list","data":[{"object":"embedding","index":1,"embedding":"`+b64(0.5, -0.25)+`"},{"object":"embedding","index":0,"embedding":"`+b64(1, 0)+`"}],"model":"m","usage":{"prompt_tokens":7,"total_tokens":7}}`)
	})
	req := embedRequest("a", "b")
	req.Embed.Dimensions = 2
	evs := run(t, s, req)
	if path.Load() != "/v1/embeddings" || body.Load() != `{"model":"m","input":["a","b"],"dimensions":2,"encoding_format":"base64"}` {
		t.Errorf("sent %s %s", path.Load(), body.Load())
	}
	if len(evs) != 2 || evs[0].Embedding == nil || !reflect.DeepEqual(evs[0].Embedding.Vectors, [][]float32{{1, 0}, {0.5, -0.25}}) {
		t.Fatalf("events %+v", evs)
	}
	if d := evs[1].Done; d == nil || d.PromptTokens != 7 {
		t.Errorf("ended with %+v, want done with 7 prompt tokens", evs[1])
	}
	// Token ids go as lists of ids.
	req = &infer.Request{Model: "m", Embed: &infer.EmbedRequest{Tokens: [][]uint32{{1, 2}, {3}}}}
	run(t, s, req)
	if !strings.Contains(body.Load().(string), `"input":[[1,2],[3]]`) {
		t.Errorf("sent %s", body.Load())
	}
}

// An answer that does not match the request is a malformed answer,
// passed on to no client: too few or too many vectors, an index twice or
// out of range, lengths that differ or are not those asked for, values
// that are not finite numbers, a body past the bound.
func TestEmbeddingsHostile(t *testing.T) {
	f, url := newFake(t)
	s, reg := newTestSet(t, Options{}, testConfig("a", url))
	// The bound is what is tested, not 64 MiB on a loaded machine.
	defer func(n int) { maxEmbedAnswer = n }(maxEmbedAnswer)
	maxEmbedAnswer = 1 << 20
	var answer atomic.Value
	f.answer(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, answer.Load().(string))
	})
	vec := func(i int, v string) string { return `{"index":` + itoa(i) + `,"embedding":"` + v + `"}` }
	one, two := b64(1), b64(1, 2)
	cases := map[string]string{
		"too few":        `{"data":[` + vec(0, one) + `]}`,
		"too many":       `{"data":[` + vec(0, one) + `,` + vec(1, one) + `,` + vec(1, one) + `]}`,
		"twice":          `{"data":[` + vec(0, one) + `,` + vec(0, one) + `]}`,
		"out of range":   `{"data":[` + vec(0, one) + `,` + vec(2, one) + `]}`,
		"no index":       `{"data":[{"embedding":"` + one + `"},` + vec(1, one) + `]}`,
		"lengths differ": `{"data":[` + vec(0, one) + `,` + vec(1, two) + `]}`,
		"empty":          `{"data":[` + vec(0, "") + `,` + vec(1, "") + `]}`,
		"not base64":     `{"data":[` + vec(0, "x!") + `,` + vec(1, one) + `]}`,
		"not float32s":   `{"data":[` + vec(0, base64.StdEncoding.EncodeToString([]byte{1, 2, 3})) + `,` + vec(1, one) + `]}`,
		"NaN":            `{"data":[` + vec(0, b64(float32(math.NaN()))) + `,` + vec(1, one) + `]}`,
		"floats":         `{"data":[{"index":0,"embedding":[1]},{"index":1,"embedding":[1]}]}`,
		"not JSON":       `{"data":`,
		"huge":           `{"data":[` + vec(0, strings.Repeat("AAAA", maxEmbedAnswer/4)) + `]}`,
	}
	for name, a := range cases {
		answer.Store(a)
		evs := run(t, s, embedRequest("a", "b"))
		if e := last(t, evs).Err; len(evs) != 1 || e == nil || e.Code != infer.CodeUpstreamLost {
			t.Errorf("%s: events %+v, want only upstream_lost", name, evs)
		}
	}
	if got := counter(t, reg, "h3infer_upstream_errors_total", "upstream", "a", "kind", kindMalformed); got != float64(len(cases)) {
		t.Errorf("errors_total{malformed}: got %v, want %d", got, len(cases))
	}
}

// b64 is a vector in OpenAI's base64 form.
func b64(v ...float32) string {
	b := make([]byte, 4*len(v))
	for i, f := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(f))
	}
	return base64.StdEncoding.EncodeToString(b)
}
