package workerconf

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// GenerationConfigFile is the file a model repository ships beside its
// tokenizer with the defaults its authors generate with; h3infer reads
// only the tokens that end a generation from it.
const GenerationConfigFile = "generation_config.json"

// ReadGenerationStops returns the token ids generation_config.json's
// eos_token_id names (one id or a list), which end a generation as
// model.json's eos_token does: Llama 3 ends its turns with <|eot_id|>,
// which its tokenizer_config.json does not call eos. A missing file means
// none; a malformed one is an error naming it.
func ReadGenerationStops(dir string) ([]int, error) {
	path := filepath.Join(dir, GenerationConfigFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read generation config: %w", err)
	}
	var cfg struct {
		EOS json.RawMessage `json:"eos_token_id"`
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(cfg.EOS) == 0 || string(cfg.EOS) == "null" {
		return nil, nil
	}
	var one int
	if json.Unmarshal(cfg.EOS, &one) == nil {
		cfg.EOS = fmt.Appendf(nil, "[%d]", one)
	}
	var ids []int
	if err := json.Unmarshal(cfg.EOS, &ids); err != nil {
		return nil, fmt.Errorf("%s: eos_token_id: must be a token id or a list of them, got %s", path, cfg.EOS)
	}
	for i, id := range ids {
		if id < 0 {
			return nil, fmt.Errorf("%s: eos_token_id[%d]: must be >= 0, got %d", path, i, id)
		}
	}
	return ids, nil
}
