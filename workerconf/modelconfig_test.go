package workerconf

import (
	"strings"
	"testing"

	"h3infer/tokenize"
)

func TestParseModelConfig(t *testing.T) {
	tests := map[string]struct {
		in   string
		want []string // substrings of the error; none means valid
	}{
		"valid":          {`{"name":"demo","context_length":64,"eos_token":"<|endoftext|>","chat_template":"plain","stop_tokens":["<|endoftext|>"]}`, nil},
		"shape facts":    {`{"name":"d","context_length":8,"eos_token":"e","vocab_size":257,"num_layers":2,"num_heads":2,"head_dim":64}`, nil},
		"unknown key":    {`{"name":"d","context_length":8,"eos_token":"e","temperature":1}`, []string{`unknown field "temperature"`}},
		"every problem":  {`{"name":"","context_length":0,"eos_token":"","chat_template":"jinja","stop_tokens":[""]}`, []string{"name:", "context_length: must be > 0, got 0", "eos_token:", "chat_template:", "stop_tokens[0]:"}},
		"negative shape": {`{"name":"d","context_length":8,"eos_token":"e","num_heads":-1}`, []string{"num_heads: must be >= 0"}},
		"trailing data":  {`{"name":"d","context_length":8,"eos_token":"e"} {}`, []string{"trailing data"}},
		"wrong type":     {`{"name":"d","context_length":"8","eos_token":"e"}`, []string{"context_length"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := parseModelConfig([]byte(tc.in))
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("got %v, want no error", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("got no error, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func FuzzParseModelConfig(f *testing.F) {
	f.Add([]byte(`{"name":"demo","context_length":64,"eos_token":"<|endoftext|>","chat_template":"plain","stop_tokens":["<|endoftext|>"]}`))
	f.Add([]byte(`{"name":"d","context_length":8,"eos_token":"e","chat_template":"chatml"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := parseModelConfig(data)
		if err == nil && (c.Name == "" || c.ContextLength <= 0 || !knownTemplate(c.ChatTemplate)) {
			t.Fatalf("accepted invalid config %+v", c)
		}
	})
}

func knownTemplate(name string) bool {
	_, ok := tokenize.LookupTemplate(name)
	return ok
}
