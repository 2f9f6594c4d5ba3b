package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"h3infer/ort"
)

// embedInputs are texts of different lengths, so that a batch pads.
var embedInputs = []string{
	"The gateway",
	"hands requests to workers over a shared-memory ring",
	"x",
	"Tokens flow back the same way and out on the QUIC stream.",
}

// referenceVectors embeds texts in this process with the encoder the
// server's demo repository serves, one at a time: what every answer of
// the server must equal.
func referenceVectors(t *testing.T, s *server, texts []string, dims int) [][]float32 {
	t.Helper()
	if err := ort.InitRuntime(ortLib(t)); err != nil {
		t.Fatal(err)
	}
	e, err := ort.LoadEncoder(filepath.Join(s.stateDir, "models", demoEncoder, "1"), ort.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	out := make([][]float32, len(texts))
	for i, text := range texts {
		v, err := e.Embed([][]int{e.EncodeSpecial(text)}, []int{dims})
		if err != nil {
			t.Fatal(err)
		}
		out[i] = v[0]
	}
	return out
}

// closeTo reports whether got, as the SDK parsed it, is want within float
// tolerance, and says how far it is.
func closeTo(got []float64, want []float32) (float64, bool) {
	if len(got) != len(want) {
		return math.Inf(1), false
	}
	d := 0.0
	for i := range got {
		d = max(d, math.Abs(got[i]-float64(want[i])))
	}
	return d, d <= 1e-5
}

func unitLength(v []float64) bool {
	ss := 0.0
	for _, x := range v {
		ss += x * x
	}
	return math.Abs(math.Sqrt(ss)-1) < 1e-5
}

// testEmbeddingsGo drives /v1/embeddings with openai-go's own types over
// HTTP/3: every shape of input, float and base64, dimensions, and the
// refusals as the SDK's typed error.
func testEmbeddingsGo(t *testing.T, s *server) {
	ctx := context.Background()
	client := goSDK(t, s)
	want := referenceVectors(t, s, embedInputs, 0)
	var resp *http.Response
	got, err := client.Embeddings.New(ctx, openai.EmbeddingNewParams{
		Model:          demoEncoder,
		Input:          openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: embedInputs},
		EncodingFormat: openai.EmbeddingNewParamsEncodingFormatFloat,
	}, option.WithResponseInto(&resp))
	if err != nil {
		t.Fatalf("Embeddings.New: %v", err)
	}
	if resp.ProtoMajor != 3 {
		t.Errorf("answered over %s, want HTTP/3", resp.Proto)
	}
	if len(got.Data) != len(embedInputs) || got.Model != demoEncoder || got.Object != "list" {
		t.Fatalf("got %d vectors of %q (%s), want %d of %q", len(got.Data), got.Model, got.Object, len(embedInputs), demoEncoder)
	}
	for i, d := range got.Data {
		if diff, ok := closeTo(d.Embedding, want[i]); !ok || d.Index != int64(i) {
			t.Errorf("data[%d]: index %d, %g from the model's vector in process", i, d.Index, diff)
		}
		if !unitLength(d.Embedding) {
			t.Errorf("data[%d] is not a unit vector", i)
		}
	}
	if got.Usage.PromptTokens <= 0 || got.Usage.TotalTokens != got.Usage.PromptTokens {
		t.Errorf("usage %+v, want prompt tokens and a total equal to them", got.Usage)
	}

	// One string, and base64: the SDK's type keeps the raw string, which
	// decodes to the float answer's values.
	one, err := client.Embeddings.New(ctx, openai.EmbeddingNewParams{
		Model:          demoEncoder,
		Input:          openai.EmbeddingNewParamsInputUnion{OfString: openai.String(embedInputs[1])},
		EncodingFormat: openai.EmbeddingNewParamsEncodingFormatBase64,
	})
	if err != nil {
		t.Fatalf("base64: %v", err)
	}
	var b64 string
	if len(one.Data) != 1 || json.Unmarshal([]byte(one.Data[0].JSON.Embedding.Raw()), &b64) != nil {
		t.Fatalf("base64 answer %s", one.RawJSON())
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(raw) != 4*len(want[1]) {
		t.Fatalf("base64 %q: %v", b64, err)
	}
	for k := range want[1] {
		if f := math.Float32frombits(leUint32(raw[4*k:])); f != float32(got.Data[1].Embedding[k]) {
			t.Fatalf("base64 value %d: %v, the float answer %v", k, f, got.Data[1].Embedding[k])
		}
	}

	// Token ids, one list and several: the same vectors as the text.
	ids := tokenizeText(t, s, embedInputs[0])
	tok, err := client.Embeddings.New(ctx, openai.EmbeddingNewParams{
		Model: demoEncoder,
		Input: openai.EmbeddingNewParamsInputUnion{OfArrayOfTokenArrays: [][]int64{ids, ids}},
	})
	if err != nil {
		t.Fatalf("token arrays: %v", err)
	}
	for i, d := range tok.Data {
		if diff, ok := closeTo(d.Embedding, want[0]); !ok {
			t.Errorf("token array %d: %g from the text's vector", i, diff)
		}
	}
	if tok.Usage.PromptTokens != int64(2*len(ids)) {
		t.Errorf("token arrays: prompt_tokens %d, want %d", tok.Usage.PromptTokens, 2*len(ids))
	}

	// dimensions: the leading values, unit length again.
	short, err := client.Embeddings.New(ctx, openai.EmbeddingNewParams{
		Model:      demoEncoder,
		Input:      openai.EmbeddingNewParamsInputUnion{OfArrayOfTokens: ids},
		Dimensions: openai.Int(8),
	})
	if err != nil {
		t.Fatalf("dimensions: %v", err)
	}
	wantShort := referenceVectors(t, s, embedInputs[:1], 8)
	if diff, ok := closeTo(short.Data[0].Embedding, wantShort[0]); !ok || !unitLength(short.Data[0].Embedding) {
		t.Errorf("dimensions 8: %d values, %g from the shortened vector, unit %v", len(short.Data[0].Embedding), diff, unitLength(short.Data[0].Embedding))
	}

	for name, tc := range map[string]struct {
		params     openai.EmbeddingNewParams
		param, msg string
	}{
		"a decoder": {openai.EmbeddingNewParams{Model: "demo", Input: openai.EmbeddingNewParamsInputUnion{OfString: openai.String("x")}},
			"model", "generates text and serves no embeddings"},
		"too many dimensions": {openai.EmbeddingNewParams{Model: demoEncoder, Input: openai.EmbeddingNewParamsInputUnion{OfString: openai.String("x")}, Dimensions: openai.Int(65)},
			"dimensions", "65 is more than the 64 values"},
		"past the context": {openai.EmbeddingNewParams{Model: demoEncoder, Input: openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: []string{"ok", strings.Repeat("y", 513)}}},
			"input", "input[1] is 513 tokens, more than the model's context length of 512"},
		"a token past the vocabulary": {openai.EmbeddingNewParams{Model: demoEncoder, Input: openai.EmbeddingNewParamsInputUnion{OfArrayOfTokens: []int64{1, 100000}}},
			"input[0][1]", "token id 100000 is not below the vocabulary size"},
	} {
		_, err := client.Embeddings.New(ctx, tc.params)
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusBadRequest || apiErr.Param != tc.param || !strings.Contains(apiErr.Message, tc.msg) {
			t.Errorf("%s: got %v (%s), want a 400 naming %s: %q", name, err, apiErr.RawJSON(), tc.param, tc.msg)
		}
	}
	_, err = client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model:    demoEncoder,
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
	})
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusBadRequest || apiErr.Param != "model" || !strings.Contains(apiErr.Message, "is an embedding model") {
		t.Errorf("chat with the encoder: got %v, want a 400 naming model", err)
	}
}

// tokenizeText is the encoder's token ids of text, from the server's own
// /tokenize.
func tokenizeText(t *testing.T, s *server, text string) []int64 {
	t.Helper()
	resp := postJSON(t, context.Background(), s.h3Client(t), s.base+"/tokenize", map[string]any{"model": demoEncoder, "prompt": text})
	defer resp.Body.Close()
	var got struct {
		Tokens []int64 `json:"tokens"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil || resp.StatusCode != http.StatusOK || len(got.Tokens) == 0 {
		t.Fatalf("/tokenize: %d %v %+v", resp.StatusCode, err, got)
	}
	return got.Tokens
}

// TestEmbeddingsBatchedEqualAlone: requests sent at once, which the
// worker batches into shared runs, get the vectors each input gets alone
// in process; and a body field OpenAI does not define is refused by name.
func TestEmbeddingsBatchedEqualAlone(t *testing.T) {
	s := startServer(t)
	client := s.h3Client(t)
	texts := make([]string, 24)
	for i := range texts {
		texts[i] = fmt.Sprintf("%s %d", embedInputs[i%len(embedInputs)], i)
	}
	want := referenceVectors(t, s, texts, 0)
	type answer struct {
		Data []struct {
			Index     int       `json:"index"`
			Embedding []float64 `json:"embedding"`
		} `json:"data"`
	}
	post := func(body map[string]any) (answer, int, string) {
		resp := postJSON(t, context.Background(), client, s.base+"/v1/embeddings", body)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var a answer
		json.Unmarshal(b, &a)
		return a, resp.StatusCode, string(b)
	}
	var wg sync.WaitGroup
	got := make([][]float64, len(texts))
	for i, text := range texts {
		wg.Go(func() {
			a, status, body := post(map[string]any{"model": demoEncoder, "input": text, "encoding_format": "float"})
			if status != http.StatusOK || len(a.Data) != 1 {
				t.Errorf("input %d: %d %s", i, status, body)
				return
			}
			got[i] = a.Data[0].Embedding
		})
	}
	wg.Wait()
	all, status, body := post(map[string]any{"model": demoEncoder, "input": texts, "encoding_format": "float"})
	if status != http.StatusOK || len(all.Data) != len(texts) {
		t.Fatalf("all at once: %d %s", status, body)
	}
	for i := range texts {
		if d, ok := closeTo(got[i], want[i]); !ok {
			t.Errorf("input %d alone over the wire: %g from the model's vector", i, d)
		}
		if d, ok := closeTo(all.Data[i].Embedding, want[i]); !ok || all.Data[i].Index != i {
			t.Errorf("input %d in one request: index %d, %g from the model's vector", i, all.Data[i].Index, d)
		}
	}
	_, status, body = post(map[string]any{"model": demoEncoder, "input": "x", "truncate_prompt_tokens": 4})
	if status != http.StatusBadRequest || !strings.Contains(body, `"param":"truncate_prompt_tokens"`) {
		t.Errorf("unknown field: %d %s, want a 400 naming it", status, body)
	}
}

func leUint32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

// checkEmbeddingsNode judges what sdk.mjs got from /v1/embeddings through
// the openai npm package: its default base64, decoded by the SDK, and the
// float answer are the model's vectors; dimensions shortens; a decoder is
// refused naming model.
func checkEmbeddingsNode(t *testing.T, s *server, out []byte) {
	t.Helper()
	var got struct {
		Embeddings *struct {
			Base64  [][]float64 `json:"base64"`
			Float   [][]float64 `json:"float"`
			Indexes []int       `json:"indexes"`
			Usage   struct {
				PromptTokens int `json:"prompt_tokens"`
				TotalTokens  int `json:"total_tokens"`
			} `json:"usage"`
			Short   []float64 `json:"short"`
			Refused *struct {
				Status int
				Param  *string
			} `json:"refused"`
		} `json:"embeddings"`
	}
	if err := json.Unmarshal(out, &got); err != nil || got.Embeddings == nil {
		t.Fatalf("sdk.mjs printed no embeddings: %v", err)
	}
	e := got.Embeddings
	want := referenceVectors(t, s, embedInputs, 0)
	if len(e.Base64) != len(want) || len(e.Float) != len(want) {
		t.Fatalf("%d base64 and %d float vectors, want %d", len(e.Base64), len(e.Float), len(want))
	}
	for i := range want {
		if d, ok := closeTo(e.Float[i], want[i]); !ok || e.Indexes[i] != i {
			t.Errorf("float %d: index %d, %g from the model's vector", i, e.Indexes[i], d)
		}
		for k := range e.Float[i] {
			if float32(e.Base64[i][k]) != float32(e.Float[i][k]) {
				t.Fatalf("vector %d value %d: base64 gave %v, float %v", i, k, e.Base64[i][k], e.Float[i][k])
			}
		}
	}
	if e.Usage.PromptTokens <= 0 || e.Usage.TotalTokens != e.Usage.PromptTokens {
		t.Errorf("usage %+v", e.Usage)
	}
	if len(e.Short) != 8 || !unitLength(e.Short) {
		t.Errorf("dimensions 8 gave %d values, unit %v", len(e.Short), unitLength(e.Short))
	}
	if r := e.Refused; r == nil || r.Status != http.StatusBadRequest || r.Param == nil || *r.Param != "model" {
		t.Errorf("embeddings from the decoder: got %+v, want a 400 naming model", r)
	}
}
