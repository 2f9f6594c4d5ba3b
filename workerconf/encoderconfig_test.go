package workerconf

import (
	"strings"
	"testing"
)

// TestParseEncoderConfig: an encoder's model.json needs no eos_token,
// defaults to mean pooling, and the encoder's keys are refused on a
// model that generates.
func TestParseEncoderConfig(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    []string // substrings of the error; none means valid
		pooling string
	}{
		"encoder defaults":  {`{"name":"e","context_length":64,"task":"embed"}`, nil, PoolMean},
		"cls and normalize": {`{"name":"e","context_length":64,"task":"embed","pooling":"cls","normalize":true,"matryoshka":true,"hidden_size":32}`, nil, PoolCLS},
		"pooled output":     {`{"name":"e","context_length":64,"task":"embed","pooling":"none"}`, nil, PoolNone},
		"unknown task":      {`{"name":"e","context_length":64,"task":"classify"}`, []string{`task: must be "generate" or "embed", got "classify"`}, ""},
		"unknown pooling":   {`{"name":"e","context_length":64,"task":"embed","pooling":"max"}`, []string{`pooling: must be`}, ""},
		"decoder keys":      {`{"name":"d","context_length":8,"eos_token":"e","pooling":"mean","normalize":true,"matryoshka":true,"hidden_size":4}`, []string{"pooling: only an encoder", "normalize: only", "matryoshka: only", "hidden_size: only"}, ""},
		"decoder needs eos": {`{"name":"d","context_length":8,"task":"generate"}`, []string{"eos_token:"}, ""},
		"negative hidden":   {`{"name":"e","context_length":8,"task":"embed","hidden_size":-1}`, []string{"hidden_size: must be >= 0"}, ""},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			c, err := parseModelConfig([]byte(tc.in))
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("got %v, want no error", err)
				}
				if !c.IsEncoder() || c.Pooling != tc.pooling {
					t.Errorf("got encoder %v pooling %q, want an encoder pooling %q", c.IsEncoder(), c.Pooling, tc.pooling)
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
