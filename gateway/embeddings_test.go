package gateway

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"h3infer/infer"
)

func TestParseEmbedding(t *testing.T) {
	ok := map[string]struct {
		body string
		want infer.EmbedRequest
		b64  bool
	}{
		"string":         {`{"model":"e","input":"hello"}`, infer.EmbedRequest{Texts: []string{"hello"}}, false},
		"strings":        {`{"model":"e","input":["a","b"],"encoding_format":"float"}`, infer.EmbedRequest{Texts: []string{"a", "b"}}, false},
		"token ids":      {`{"model":"e","input":[1,2,4294967295],"encoding_format":"base64"}`, infer.EmbedRequest{Tokens: [][]uint32{{1, 2, math.MaxUint32}}}, true},
		"token id lists": {`{"model":"e","input":[[1],[2,3]],"dimensions":8,"user":"x"}`, infer.EmbedRequest{Tokens: [][]uint32{{1}, {2, 3}}, Dimensions: 8}, false},
		"null format":    {`{"model":"e","input":"x","encoding_format":null,"dimensions":null}`, infer.EmbedRequest{Texts: []string{"x"}}, false},
	}
	for name, tc := range ok {
		t.Run(name, func(t *testing.T) {
			e, err := parseEmbedding([]byte(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(e.req, tc.want) || e.base64 != tc.b64 {
				t.Errorf("got %+v base64 %v, want %+v base64 %v", e.req, e.base64, tc.want, tc.b64)
			}
		})
	}
	tooMany := `{"model":"e","input":[` + strings.Repeat(`"x",`, infer.MaxEmbedInputs) + `"x"]}`
	tooLong := `{"model":"e","input":[` + strings.Repeat(`1,`, infer.MaxEmbedTokens) + `1]}`
	bad := map[string]struct{ body, param, want string }{
		"unknown field":   {`{"model":"e","input":"x","truncate":true}`, "truncate", "truncate: unknown parameter"},
		"no model":        {`{"input":"x"}`, "model", "model: required"},
		"no input":        {`{"model":"e"}`, "input", "input: required"},
		"empty string":    {`{"model":"e","input":""}`, "input", "input: must not be empty"},
		"empty array":     {`{"model":"e","input":[]}`, "input", "input: must not be empty"},
		"empty in list":   {`{"model":"e","input":["a",""]}`, "input", "input[1]: must not be empty"},
		"mixed":           {`{"model":"e","input":["a",1]}`, "input", "input[1]: must be a string"},
		"empty ids":       {`{"model":"e","input":[[1],[]]}`, "input", "input[1]: must not be empty"},
		"negative id":     {`{"model":"e","input":[1,-2]}`, "input", "input[1]: token ids are non-negative integers, got -2"},
		"fractional id":   {`{"model":"e","input":[[1.5]]}`, "input", "input[0][0]: token ids are non-negative integers, got 1.5"},
		"huge id":         {`{"model":"e","input":[4294967296]}`, "input", "token ids are non-negative integers"},
		"object":          {`{"model":"e","input":{"a":1}}`, "input", "input: must be a string, an array of strings"},
		"too many":        {tooMany, "input", "input: at most 2048 inputs, got 2049"},
		"too many tokens": {tooLong, "input", "input: more than 300000 tokens in all"},
		"format":          {`{"model":"e","input":"x","encoding_format":"binary"}`, "encoding_format", `encoding_format: must be "float" or "base64", got "binary"`},
		"dimensions zero": {`{"model":"e","input":"x","dimensions":0}`, "dimensions", "dimensions: must be a positive integer, got 0"},
	}
	for name, tc := range bad {
		t.Run(name, func(t *testing.T) {
			_, err := parseEmbedding([]byte(tc.body))
			var ip *invalidParam
			if !errors.As(err, &ip) || ip.param != tc.param || !strings.Contains(ip.message, tc.want) {
				t.Errorf("got %v, want a 400 on %s mentioning %q", err, tc.param, tc.want)
			}
		})
	}
	if _, err := parseEmbedding([]byte(`{"model":"e","input":"x"} {}`)); err == nil {
		t.Error("trailing data accepted")
	}
}

// TestAppendEmbeddings: the float answer reads back as the same float32
// values, and the base64 answer decodes to their bytes.
func TestAppendEmbeddings(t *testing.T) {
	vecs := [][]float32{{0.1, -1.5e-7, 3.4028235e38, 0}, {1, 2, 3, 4}}
	for _, b64 := range []bool{false, true} {
		e := &embedding{model: "enc\"1", base64: b64}
		body, err := appendEmbeddings(nil, e, vecs, 42)
		if err != nil {
			t.Fatal(err)
		}
		var got struct {
			Object string `json:"object"`
			Data   []struct {
				Object    string          `json:"object"`
				Index     int             `json:"index"`
				Embedding json.RawMessage `json:"embedding"`
			} `json:"data"`
			Model string `json:"model"`
			Usage struct {
				PromptTokens int `json:"prompt_tokens"`
				TotalTokens  int `json:"total_tokens"`
			} `json:"usage"`
		}
		if err := json.Unmarshal(body, &got); err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		if got.Object != "list" || got.Model != e.model || got.Usage.PromptTokens != 42 || got.Usage.TotalTokens != 42 || len(got.Data) != 2 {
			t.Fatalf("got %s", body)
		}
		for i, d := range got.Data {
			var v []float32
			if b64 {
				var s string
				json.Unmarshal(d.Embedding, &s)
				raw, err := base64.StdEncoding.DecodeString(s)
				if err != nil || len(raw) != 4*len(vecs[i]) {
					t.Fatalf("embedding %d: %q: %v", i, s, err)
				}
				for k := 0; k < len(raw); k += 4 {
					v = append(v, math.Float32frombits(binary.LittleEndian.Uint32(raw[k:])))
				}
			} else if err := json.Unmarshal(d.Embedding, &v); err != nil {
				t.Fatal(err)
			}
			if d.Index != i || d.Object != "embedding" || !reflect.DeepEqual(v, vecs[i]) {
				t.Errorf("base64 %v: data[%d] = %d %s %v, want %v", b64, i, d.Index, d.Object, v, vecs[i])
			}
		}
	}
	if _, err := appendEmbeddings(nil, &embedding{}, [][]float32{{float32(math.NaN())}}, 1); err == nil {
		t.Error("a NaN became JSON")
	}
}

func FuzzParseEmbedding(f *testing.F) {
	seeds, err := filepath.Glob("testdata/embeddings/*.json")
	if err != nil {
		f.Fatal(err)
	}
	for _, name := range seeds {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		e, err := parseEmbedding(body)
		if err != nil {
			return
		}
		n := e.req.Len()
		if e.model == "" || n == 0 || n > infer.MaxEmbedInputs || (e.req.Texts != nil) == (e.req.Tokens != nil) {
			t.Fatalf("accepted %+v", e)
		}
		for _, ids := range e.req.Tokens {
			if len(ids) == 0 {
				t.Fatal("accepted an empty token list")
			}
		}
	})
}
