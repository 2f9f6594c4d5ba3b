package gateway

import (
	"net/http"
	"strings"
	"testing"
)

// TestParseTokenize checks each refusal of a /tokenize body names the
// parameter at fault, and vLLM's defaults.
func TestParseTokenize(t *testing.T) {
	for name, c := range map[string]struct {
		body   string
		status int
		param  string
	}{
		"prompt":                     {`{"model": "m", "prompt": "hi"}`, 200, ""},
		"chat":                       {`{"model": "m", "messages": [{"role": "user", "content": "hi"}]}`, 200, ""},
		"unknown field":              {`{"model": "m", "prompt": "hi", "truncate": 5}`, 400, "truncate"},
		"prompt of the wrong type":   {`{"model": "m", "prompt": 5}`, 400, "prompt"},
		"prompt as token ids":        {`{"model": "m", "prompt": [1, 2]}`, 400, "prompt"},
		"both":                       {`{"model": "m", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}`, 400, "messages"},
		"neither":                    {`{"model": "m"}`, 400, "prompt"},
		"no model":                   {`{"prompt": "hi"}`, 400, "model"},
		"empty messages":             {`{"model": "m", "messages": []}`, 400, "messages"},
		"bad role":                   {`{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}`, 400, "messages[0].role"},
		"chat option with a prompt":  {`{"model": "m", "prompt": "a", "add_generation_prompt": true}`, 400, "add_generation_prompt"},
		"continue_final_message":     {`{"model": "m", "messages": [{"role": "user", "content": "b"}], "continue_final_message": true}`, 400, "continue_final_message"},
		"own chat template":          {`{"model": "m", "messages": [{"role": "user", "content": "b"}], "chat_template": "{{x}}"}`, 400, "chat_template"},
		"tools":                      {`{"model": "m", "messages": [{"role": "user", "content": "b"}], "tools": [{"type": "function"}]}`, 400, "tools"},
		"add_special_tokens as text": {`{"model": "m", "prompt": "a", "add_special_tokens": "yes"}`, 400, "add_special_tokens"},
		"trailing data":              {`{"model": "m", "prompt": "a"} {}`, 400, "<null>"},
		"not JSON":                   {`model=m`, 400, "<null>"},
	} {
		_, _, err := parseTokenize([]byte(c.body))
		if c.status == 200 {
			if err != nil {
				t.Errorf("%s: %v", name, err)
			}
			continue
		}
		e := apiErrorOf(err)
		if e.status != c.status || deref(e.body.Param) != c.param {
			t.Errorf("%s: %d param %q (%v), want %d param %q", name, e.status, deref(e.body.Param), err, c.status, c.param)
		}
	}
	_, job, _ := parseTokenize([]byte(`{"model": "m", "prompt": "a"}`))
	if !job.addSpecial || job.tokenStrs {
		t.Errorf("prompt defaults: %+v, want add_special_tokens true, no token strings", job)
	}
	_, job, _ = parseTokenize([]byte(`{"model": "m", "messages": [{"role": "user", "content": "b"}], "return_token_strs": true}`))
	if job.addSpecial || !job.addGenerationPrompt || !job.tokenStrs {
		t.Errorf("chat defaults: %+v, want add_special_tokens false, add_generation_prompt true", job)
	}
}

func TestParseDetokenize(t *testing.T) {
	for body, param := range map[string]string{
		`{"model": "m", "tokens": [1, 2]}`:      "",
		`{"model": "m", "tokens": []}`:          "",
		`{"model": "m"}`:                        "tokens",
		`{"model": "m", "tokens": [1.5]}`:       "tokens",
		`{"model": "m", "tokens": ["1"]}`:       "tokens",
		`{"model": "m", "tokens": [1e30]}`:      "tokens",
		`{"model": "m", "tokens": [1], "x": 1}`: "x",
		`{"tokens": [1]}`:                       "model",
	} {
		_, _, err := parseDetokenize([]byte(body))
		if param == "" {
			if err != nil {
				t.Errorf("%s: %v", body, err)
			}
			continue
		}
		if e := apiErrorOf(err); e.status != http.StatusBadRequest || !strings.HasPrefix(deref(e.body.Param), param) {
			t.Errorf("%s: %d param %q (%v), want 400 naming %s", body, e.status, deref(e.body.Param), err, param)
		}
	}
}

// FuzzParseTokenize: no body makes the parsers panic, and every refusal
// is a 400 or a 413, never a server error.
func FuzzParseTokenize(f *testing.F) {
	f.Add([]byte(`{"model": "m", "prompt": "hi", "add_special_tokens": false, "return_token_strs": true}`))
	f.Add([]byte(`{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "add_generation_prompt": true}`))
	f.Add([]byte(`{"model": "m", "tokens": [0, 1, -5]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		if _, _, err := parseTokenize(body); err != nil {
			if s := apiErrorOf(err).status; s != http.StatusBadRequest {
				t.Fatalf("/tokenize %q: status %d (%v)", body, s, err)
			}
		}
		if _, _, err := parseDetokenize(body); err != nil {
			if s := apiErrorOf(err).status; s != http.StatusBadRequest {
				t.Fatalf("/detokenize %q: status %d (%v)", body, s, err)
			}
		}
	})
}
