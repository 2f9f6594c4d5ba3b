package workerconf

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestReadGenerationStops(t *testing.T) {
	for name, tc := range map[string]struct {
		file string // "" leaves the file out
		want []int
		err  string
	}{
		"no file":      {},
		"one id":       {file: `{"bos_token_id": 1, "eos_token_id": 2}`, want: []int{2}},
		"a list":       {file: `{"eos_token_id": [128001, 128008, 128009], "temperature": 0.6}`, want: []int{128001, 128008, 128009}},
		"null":         {file: `{"eos_token_id": null}`},
		"absent":       {file: `{"do_sample": true}`},
		"a string":     {file: `{"eos_token_id": "</s>"}`, err: "eos_token_id: must be a token id or a list of them"},
		"negative":     {file: `{"eos_token_id": [1, -2]}`, err: "eos_token_id[1]: must be >= 0, got -2"},
		"not json":     {file: `{eos`, err: GenerationConfigFile},
		"float id":     {file: `{"eos_token_id": 2.5}`, err: "eos_token_id: must be a token id"},
		"list of list": {file: `{"eos_token_id": [[1]]}`, err: "eos_token_id: must be a token id"},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.file != "" {
				if err := os.WriteFile(filepath.Join(dir, GenerationConfigFile), []byte(tc.file), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, err := ReadGenerationStops(dir)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %v, %v; want an error mentioning %q", got, err, tc.err)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Errorf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}
