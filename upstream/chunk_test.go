package upstream

import (
	"encoding/json"
	"reflect"
	"testing"
)

// chunkSeeds are events as servers write them, and the corners where a
// hand-written reader is most likely to part from encoding/json.
var chunkSeeds = []string{
	`{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1765000000,"model":"big","choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null}]}`,
	`{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1765000000,"model":"big","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null}`,
	`{"id":"cmpl-1","object":"text_completion","created":1,"model":"big","choices":[{"index":0,"text":"\n\u00e9\"x","logprobs":null,"finish_reason":"length","stop_reason":null}]}`,
	`{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":64,"total_tokens":76}}`,
	`{"error":{"message":"boom","type":"server_error","code":"context_length_exceeded"}}`,
	`{"choices":[{"delta":{"content":"a"}}],"choices":[{"delta":{}}]}`,
	`{"Choices":[{"Delta":{"Content":"case"}}]}`,
	`{"choices":[{"delta":{"content":"a"},"delta":{}}]}`,
	`{"usage":{"prompt_tokens":-1}}`,
	`{"usage":{"prompt_tokens":1.5}}`,
	`{"usage":{"prompt_tokens":4294967296}}`,
	`{"choices":[null,{"text":null,"finish_reason":"stop"}]}`,
	`{"choices":[{"text":5}]}`,
	`{"x":[1,-2.5e+3,true,false,null,{"y":"\ud800"}],"choices":[{"text":"ok"}]} `,
	`{"x":"\q"}`,
	`{"x":01}`,
	"{\"choices\":[{\"text\":\"\xff\"}]}",
	`{"choices":[{"text":"a"}]} trailing`,
	`[]`,
	`null`,
	`{"error":null}`,
	`{"completion_to\u212aens":1}`,
	`{"usage":{"completion_to` + "\u212a" + `ens":7}}`,
	`{"choices":[{"index":0,"delta":{"content":"\u00e9"},"logprobs":{"content":[{"token":"\u00e9","logprob":-0.25,"bytes":[195,169],"top_logprobs":[{"token":"\u00e9","logprob":-0.25,"bytes":[195,169]}]}]},"finish_reason":null}]}`,
	`{"choices":[{"text":" a","logprobs":{"tokens":[" a"],"token_logprobs":[-1.5],"top_logprobs":[{" a":-1.5," b":-2}],"text_offset":[0]}}]}`,
	`{"choices":[{"text":"a","logprobs":{"tokens":[]},"logprobs":null}]}`,
}

// FuzzDecodeChunk holds the fast reader to encoding/json: the same chunk
// for every document encoding/json takes, an error for every one it
// refuses.
func FuzzDecodeChunk(f *testing.F) {
	for _, s := range chunkSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkDecodeChunk(t, data)
	})
}

func TestDecodeChunkAgreesWithEncodingJSON(t *testing.T) {
	for _, s := range chunkSeeds {
		checkDecodeChunk(t, []byte(s))
	}
	// The common shapes take the fast path.
	for _, s := range chunkSeeds[:5] {
		var ch chunk
		if !fastChunk([]byte(s), &ch) {
			t.Errorf("%s: not read on the fast path", s)
		}
	}
}

func checkDecodeChunk(t *testing.T, data []byte) {
	t.Helper()
	var want, got chunk
	wantErr := json.Unmarshal(data, &want)
	gotErr := decodeChunk(data, &got)
	if (wantErr == nil) != (gotErr == nil) {
		t.Fatalf("%q: encoding/json says %v, decodeChunk %v", data, wantErr, gotErr)
	}
	if wantErr == nil && !reflect.DeepEqual(normal(want), normal(got)) {
		t.Fatalf("%q:\nencoding/json %+v\ndecodeChunk   %+v", data, want, got)
	}
}

// normal makes an empty slice and nil alike: neither has a choice.
func normal(c chunk) chunk {
	if len(c.Choices) == 0 {
		c.Choices = nil
	}
	return c
}

func BenchmarkDecodeChunk(b *testing.B) {
	data := []byte(chunkSeeds[0])
	b.Run("fast", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var ch chunk
			if err := decodeChunk(data, &ch); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoding_json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var ch chunk
			if err := json.Unmarshal(data, &ch); err != nil {
				b.Fatal(err)
			}
		}
	})
}
