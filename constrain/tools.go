package constrain

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
)

// Function calls: the documents of a tool call grammar are a call in a
// model family's own syntax, literal text around the call's arguments,
// and the arguments a JSON object that the function's parameters schema
// accepts. The family's syntax is the caller's business; this file only
// joins text and schemas.

// ValidName reports whether s is a name OpenAI accepts for a function or
// a json_schema: 1 to 64 letters, digits, underscores or dashes.
func ValidName(s string) bool { return validName(s) }

// emptyParameters is the schema of a function that takes no arguments:
// OpenAI's parameters may be left out.
var emptyParameters = json.RawMessage(`{"type":"object","properties":{}}`)

// CheckParameters compiles a function's parameters schema, found at path
// (tools[0].function.parameters, say), as structured outputs would, and
// returns the first thing the grammar cannot enforce as a *FormatError
// naming its place. Absent or null parameters are an empty object.
func CheckParameters(raw json.RawMessage, path string) error {
	if len(raw) > MaxFormatBytes {
		return &FormatError{path, fmt.Sprintf("at most %d bytes, got %d", MaxFormatBytes, len(raw))}
	}
	_, err := new(Grammar).compileInto(parameters(raw), path)
	return err
}

func parameters(raw json.RawMessage) json.RawMessage {
	if raw = bytes.TrimSpace(raw); len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return emptyParameters
	}
	return raw
}

// Call is one call a constrained completion may be: Prefix, then a JSON
// object the Parameters schema accepts, then Suffix. Prefix and Suffix
// must not be empty (a call's syntax always opens and closes).
type Call struct {
	Prefix     string
	Parameters json.RawMessage
	Suffix     string
}

// Calls compiles the grammar whose documents are exactly one of calls: a
// completion that must call a function (tool_choice "required", or a
// named function, which is one Call). Its Complete is true once the
// Suffix is read, so a completion ends on the call.
func Calls(calls []Call) (*Grammar, error) {
	if len(calls) == 0 {
		return nil, &FormatError{"tools", "no function to call"}
	}
	g := &Grammar{}
	h := sha256.New()
	alts := make([]int32, 0, len(calls))
	for i, c := range calls {
		if c.Prefix == "" || c.Suffix == "" {
			return nil, fmt.Errorf("constrain: call %d: empty prefix or suffix", i)
		}
		path := fmt.Sprintf("tools[%d].function.parameters", i)
		params := parameters(c.Parameters)
		if len(params) > MaxFormatBytes {
			return nil, &FormatError{path, fmt.Sprintf("at most %d bytes, got %d", MaxFormatBytes, len(params))}
		}
		args, err := g.compileInto(params, path)
		if err != nil {
			return nil, err
		}
		id := int32(len(g.nodes))
		if len(g.nodes) >= MaxNodes {
			return nil, &FormatError{"tools", fmt.Sprintf("the schemas have more than %d parts", MaxNodes)}
		}
		// An object node is literal text between its children: here the
		// call's opening, its arguments and its closing.
		g.nodes = append(g.nodes, node{kind: kObject, segs: []string{c.Prefix, c.Suffix}, children: []int32{args}})
		alts = append(alts, id)
		var compact bytes.Buffer
		_ = json.Compact(&compact, params)
		fmt.Fprintf(h, "%d:%s%d:%s%d:%s", len(c.Prefix), c.Prefix, compact.Len(), compact.Bytes(), len(c.Suffix), c.Suffix)
	}
	g.root = alts[0]
	if len(alts) > 1 {
		g.root = int32(len(g.nodes))
		g.nodes = append(g.nodes, node{kind: kAnyOf, children: alts})
	}
	g.key = "calls:" + string(h.Sum(nil))
	return g, nil
}
