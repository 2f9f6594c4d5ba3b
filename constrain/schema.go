// Package constrain turns OpenAI's response_format into a grammar of JSON
// text, and computes at each step of a generation which tokens of a
// model's vocabulary keep the text a prefix of a document the grammar
// accepts: the token mask of constrained decoding. It reads schemas from
// strangers, so every size it accepts is bounded. It imports nothing of
// h3infer's and knows nothing of models, HTTP or the ring.
package constrain

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
)

// Bounds on what a client's response_format may ask for. They keep the
// compile, the matcher's states and the mask cache small whatever a client
// sends; docs/SECURITY.md lists them.
const (
	// MaxFormatBytes bounds the response_format's JSON text.
	MaxFormatBytes = 64 << 10
	// MaxDepth bounds how deeply objects and arrays nest in a schema
	// (OpenAI's limit is 10 levels), and in a json_object document.
	MaxDepth = 10
	// MaxNodes bounds the schemas of a grammar, after $ref is inlined.
	MaxNodes = 2000
	// MaxEnumValues bounds enum and const values over the whole schema.
	MaxEnumValues = 1000
	// MaxItems bounds minItems and maxItems.
	MaxItems = 1000
)

// FormatError is a response_format the server refuses. Path locates the
// fault from response_format, as a client would write it.
type FormatError struct {
	Path    string
	Message string
}

func (e *FormatError) Error() string { return e.Path + ": " + e.Message }

// kind is what a node of the grammar matches.
type kind uint8

const (
	kLiteral   kind = iota // exactly lit
	kString                // any JSON string
	kNumber                // any JSON number (digit counts bounded)
	kInteger               // a JSON number without fraction or exponent
	kObject                // segs[0] children[0] segs[1] ... segs[len-1]
	kArray                 // '[' children[0] (',' children[0])* ']', min to max items
	kAnyOf                 // one of children
	kAnyObject             // any JSON object (json_object)
	kAnyArray              // any JSON array, inside a json_object
)

type node struct {
	kind kind
	lit  string
	// segs are an object's literal text around its property values: the
	// opening brace and first key, the comma and each next key, the
	// closing brace. Properties come in the order the schema lists them.
	segs     []string
	children []int32
	min, max int32 // kArray: item counts; max < 0 is unbounded
	// nested marks the alternatives of a json_object's value that open
	// an object or array, which MaxDepth cuts.
	nested bool
}

// Grammar is a compiled response_format. It is immutable and may be shared
// by any number of matchers.
type Grammar struct {
	nodes []node
	root  int32
	// key identifies the grammar in a vocabulary's mask cache.
	key string
}

// Parse reads a response_format, as OpenAI's chat completions take it,
// and compiles it. It returns nil and no error for {"type":"text"}, which
// asks for nothing. Errors are *FormatError.
func Parse(raw []byte) (*Grammar, error) {
	if len(raw) > MaxFormatBytes {
		return nil, &FormatError{"response_format", fmt.Sprintf("at most %d bytes, got %d", MaxFormatBytes, len(raw))}
	}
	var f struct {
		Type       string          `json:"type"`
		JSONSchema json.RawMessage `json:"json_schema"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, &FormatError{"response_format", "must be an object with type text, json_object or json_schema: " + err.Error()}
	}
	switch f.Type {
	case "text":
		if len(f.JSONSchema) > 0 {
			return nil, &FormatError{"response_format.json_schema", `only allowed with type "json_schema"`}
		}
		return nil, nil
	case "json_object":
		if len(f.JSONSchema) > 0 {
			return nil, &FormatError{"response_format.json_schema", `only allowed with type "json_schema"`}
		}
		return anyObject(), nil
	case "json_schema":
	default:
		return nil, &FormatError{"response_format.type", fmt.Sprintf("must be text, json_object or json_schema, got %q", f.Type)}
	}
	var js struct {
		Name        string          `json:"name"`
		Description string          `json:"description"`
		Schema      json.RawMessage `json:"schema"`
		Strict      *bool           `json:"strict"`
	}
	dec = json.NewDecoder(bytes.NewReader(f.JSONSchema))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&js); err != nil {
		return nil, &FormatError{"response_format.json_schema", "must be an object with name, schema, and optionally description and strict: " + err.Error()}
	}
	if !validName(js.Name) {
		return nil, &FormatError{"response_format.json_schema.name", fmt.Sprintf("must be 1 to 64 letters, digits, underscores or dashes, got %q", js.Name)}
	}
	if len(js.Schema) == 0 || bytes.Equal(js.Schema, []byte("null")) {
		return nil, &FormatError{"response_format.json_schema.schema", "required"}
	}
	return compileSchema(js.Schema, "response_format.json_schema.schema")
}

func validName(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for _, c := range []byte(s) {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// anyObject is json_object's grammar: any JSON object, nested at most
// MaxDepth deep.
func anyObject() *Grammar {
	g := &Grammar{key: "json_object"}
	// 0 object, 1 value, 2 array, 3 string, 4 number, 5-7 the literals.
	g.nodes = []node{
		{kind: kAnyObject},
		{kind: kAnyOf, children: []int32{0, 2, 3, 4, 5, 6, 7}},
		{kind: kAnyArray},
		{kind: kString},
		{kind: kNumber},
		{kind: kLiteral, lit: "true"},
		{kind: kLiteral, lit: "false"},
		{kind: kLiteral, lit: "null"},
	}
	return g
}

// compiler turns one schema into nodes.
type compiler struct {
	g     *Grammar
	root  map[string]json.RawMessage
	defs  map[string]json.RawMessage // "#/$defs/x" and "#/definitions/x"
	refs  []string                   // $refs being inlined, to refuse recursion
	enums int
	// inlined counts the bytes of the definitions $ref has inlined, so
	// that a small definition referred to from everywhere cannot make
	// the compile parse without end.
	inlined int
}

// maxInlined bounds compiler.inlined.
const maxInlined = 1 << 20

// annotations are keywords that describe and constrain nothing the
// grammar enforces, which every schema may carry.
var annotations = map[string]bool{
	"title": true, "description": true, "$schema": true, "$id": true, "$comment": true,
	"examples": true, "default": true, "deprecated": true, "readOnly": true, "writeOnly": true,
}

func compileSchema(raw json.RawMessage, path string) (*Grammar, error) {
	g := &Grammar{}
	root, err := g.compileInto(raw, path)
	if err != nil {
		return nil, err
	}
	g.root = root
	var compact bytes.Buffer
	_ = json.Compact(&compact, raw)
	sum := sha256.Sum256(compact.Bytes())
	g.key = "json_schema:" + string(sum[:])
	return g, nil
}

// compileInto compiles the object schema raw, found at path, into g's
// nodes and returns its node.
func (g *Grammar) compileInto(raw json.RawMessage, path string) (int32, error) {
	c := &compiler{g: g, defs: map[string]json.RawMessage{}, refs: []string{"#"}}
	if err := json.Unmarshal(raw, &c.root); err != nil {
		return 0, &FormatError{path, "must be a JSON Schema object"}
	}
	for _, defs := range []string{"$defs", "definitions"} {
		d, ok := c.root[defs]
		if !ok {
			continue
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal(d, &m); err != nil {
			return 0, &FormatError{path + "." + defs, "must be an object of schemas"}
		}
		for name, s := range m {
			c.defs["#/"+defs+"/"+name] = s
		}
	}
	root, err := c.schema(c.root, path, 0, true)
	if err != nil {
		return 0, err
	}
	if c.g.nodes[root].kind != kObject {
		return 0, &FormatError{path, `the root must be an object schema ("type": "object"), as OpenAI requires`}
	}
	return root, nil
}

func (c *compiler) add(n node, path string) (int32, error) {
	if len(c.g.nodes) >= MaxNodes {
		return 0, &FormatError{path, fmt.Sprintf("the schema has more than %d parts", MaxNodes)}
	}
	c.g.nodes = append(c.g.nodes, n)
	return int32(len(c.g.nodes) - 1), nil
}

// schema compiles the schema s found at path, depth objects and arrays
// deep; atRoot allows the root's $defs.
func (c *compiler) schema(s map[string]json.RawMessage, path string, depth int, atRoot bool) (int32, error) {
	if ref, ok := s["$ref"]; ok {
		return c.ref(s, ref, path, depth)
	}
	keys := make([]string, 0, len(s))
	for k := range s {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	handled := map[string]bool{}
	for _, k := range keys {
		switch {
		case annotations[k]:
			handled[k] = true
		case atRoot && (k == "$defs" || k == "definitions"):
			handled[k] = true
		}
	}
	var id int32
	var err error
	switch {
	case s["enum"] != nil || s["const"] != nil:
		id, err = c.enum(s, path, handled)
	case s["anyOf"] != nil:
		id, err = c.anyOf(s["anyOf"], path, depth)
		handled["anyOf"] = true
	case s["type"] != nil:
		id, err = c.typed(s, path, depth, handled)
	default:
		return 0, &FormatError{path, `must say its "type", or give "enum", "const", "anyOf" or "$ref"`}
	}
	if err != nil {
		return 0, err
	}
	for _, k := range keys {
		if !handled[k] {
			return 0, &FormatError{path, fmt.Sprintf("%q is not supported here", k)}
		}
	}
	return id, nil
}

func (c *compiler) ref(s map[string]json.RawMessage, raw json.RawMessage, path string, depth int) (int32, error) {
	var ref string
	if err := json.Unmarshal(raw, &ref); err != nil {
		return 0, &FormatError{path + ".$ref", "must be a string"}
	}
	for k := range s {
		if k != "$ref" && !annotations[k] {
			return 0, &FormatError{path, fmt.Sprintf("%q beside $ref is not supported", k)}
		}
	}
	var target map[string]json.RawMessage
	if ref == "#" {
		target = c.root
	} else if d, ok := c.defs[ref]; ok {
		if c.inlined += len(d); c.inlined > maxInlined {
			return 0, &FormatError{path + ".$ref", fmt.Sprintf("the schema's references inline more than %d bytes", maxInlined)}
		}
		if err := json.Unmarshal(d, &target); err != nil {
			return 0, &FormatError{path + ".$ref", fmt.Sprintf("%s is not a schema object", ref)}
		}
	} else {
		return 0, &FormatError{path + ".$ref", fmt.Sprintf("only #, #/$defs/name and #/definitions/name are supported, got %q", ref)}
	}
	if slices.Contains(c.refs, ref) {
		return 0, &FormatError{path + ".$ref", fmt.Sprintf("recursive schemas are not supported (%s refers to itself)", ref)}
	}
	c.refs = append(c.refs, ref)
	defer func() { c.refs = c.refs[:len(c.refs)-1] }()
	delete(target, "$defs")
	delete(target, "definitions")
	return c.schema(target, path+".$ref("+ref+")", depth, false)
}

func (c *compiler) enum(s map[string]json.RawMessage, path string, handled map[string]bool) (int32, error) {
	var values []json.RawMessage
	if raw, ok := s["const"]; ok {
		if s["enum"] != nil {
			return 0, &FormatError{path, "give enum or const, not both"}
		}
		values, handled["const"] = []json.RawMessage{raw}, true
	} else {
		if err := json.Unmarshal(s["enum"], &values); err != nil || len(values) == 0 {
			return 0, &FormatError{path + ".enum", "must be a non-empty array"}
		}
		handled["enum"] = true
	}
	// A type beside an enum must hold for every value; the values alone
	// then say what the output may be.
	handled["type"] = true
	var types []string
	if t, ok := s["type"]; ok {
		var err error
		if types, err = typeList(t, path); err != nil {
			return 0, err
		}
	}
	if c.enums += len(values); c.enums > MaxEnumValues {
		return 0, &FormatError{path, fmt.Sprintf("the schema has more than %d enum and const values", MaxEnumValues)}
	}
	alts := make([]int32, 0, len(values))
	seen := map[string]bool{}
	for i, v := range values {
		var compact bytes.Buffer
		if err := json.Compact(&compact, v); err != nil {
			return 0, &FormatError{fmt.Sprintf("%s.enum[%d]", path, i), "must be JSON"}
		}
		lit := compact.String()
		if types != nil && !slices.Contains(types, jsonType(lit)) && !(jsonType(lit) == "integer" && slices.Contains(types, "number")) {
			return 0, &FormatError{fmt.Sprintf("%s.enum[%d]", path, i), fmt.Sprintf("%s is not of the schema's type %v", lit, types)}
		}
		if seen[lit] {
			continue
		}
		seen[lit] = true
		id, err := c.add(node{kind: kLiteral, lit: lit}, path)
		if err != nil {
			return 0, err
		}
		alts = append(alts, id)
	}
	if len(alts) == 1 {
		return alts[0], nil
	}
	return c.add(node{kind: kAnyOf, children: alts}, path)
}

// jsonType is the JSON Schema type of a compact JSON value.
func jsonType(v string) string {
	switch v[0] {
	case '{':
		return "object"
	case '[':
		return "array"
	case '"':
		return "string"
	case 't', 'f':
		return "boolean"
	case 'n':
		return "null"
	}
	if f, err := strconv.ParseFloat(v, 64); err == nil && f == math.Trunc(f) && !strings.ContainsAny(v, ".eE") {
		return "integer"
	}
	return "number"
}

func (c *compiler) anyOf(raw json.RawMessage, path string, depth int) (int32, error) {
	var alts []map[string]json.RawMessage
	if err := json.Unmarshal(raw, &alts); err != nil || len(alts) == 0 {
		return 0, &FormatError{path + ".anyOf", "must be a non-empty array of schemas"}
	}
	n := node{kind: kAnyOf}
	for i, a := range alts {
		id, err := c.schema(a, fmt.Sprintf("%s.anyOf[%d]", path, i), depth, false)
		if err != nil {
			return 0, err
		}
		n.children = append(n.children, id)
	}
	return c.add(n, path)
}

var schemaTypes = []string{"object", "array", "string", "number", "integer", "boolean", "null"}

func typeList(raw json.RawMessage, path string) ([]string, error) {
	var one string
	var list []string
	if json.Unmarshal(raw, &one) == nil {
		list = []string{one}
	} else if err := json.Unmarshal(raw, &list); err != nil || len(list) == 0 {
		return nil, &FormatError{path + ".type", "must be a type name or a non-empty array of them"}
	}
	for _, t := range list {
		if !slices.Contains(schemaTypes, t) {
			return nil, &FormatError{path + ".type", fmt.Sprintf("must be one of %s, got %q", strings.Join(schemaTypes, ", "), t)}
		}
	}
	return list, nil
}

func (c *compiler) typed(s map[string]json.RawMessage, path string, depth int, handled map[string]bool) (int32, error) {
	handled["type"] = true
	types, err := typeList(s["type"], path)
	if err != nil {
		return 0, err
	}
	var alts []int32
	for _, t := range types {
		var id int32
		var err error
		switch t {
		case "object":
			id, err = c.object(s, path, depth, handled)
		case "array":
			id, err = c.array(s, path, depth, handled)
		case "string":
			id, err = c.add(node{kind: kString}, path)
		case "number":
			id, err = c.add(node{kind: kNumber}, path)
		case "integer":
			id, err = c.add(node{kind: kInteger}, path)
		case "boolean":
			var t, f int32
			if t, err = c.add(node{kind: kLiteral, lit: "true"}, path); err == nil {
				if f, err = c.add(node{kind: kLiteral, lit: "false"}, path); err == nil {
					id, err = c.add(node{kind: kAnyOf, children: []int32{t, f}}, path)
				}
			}
		case "null":
			id, err = c.add(node{kind: kLiteral, lit: "null"}, path)
		}
		if err != nil {
			return 0, err
		}
		alts = append(alts, id)
	}
	if len(alts) == 1 {
		return alts[0], nil
	}
	return c.add(node{kind: kAnyOf, children: alts}, path)
}

func (c *compiler) object(s map[string]json.RawMessage, path string, depth int, handled map[string]bool) (int32, error) {
	if depth >= MaxDepth {
		return 0, &FormatError{path, fmt.Sprintf("objects and arrays nest more than %d deep", MaxDepth)}
	}
	handled["properties"], handled["required"], handled["additionalProperties"] = true, true, true
	if ap, ok := s["additionalProperties"]; ok && !bytes.Equal(bytes.TrimSpace(ap), []byte("false")) {
		return 0, &FormatError{path + ".additionalProperties", "must be false: every property must be named in properties"}
	}
	// Property order is the schema's, which a map loses: walk the JSON.
	var names []string
	props := map[string]json.RawMessage{}
	if raw, ok := s["properties"]; ok {
		var err error
		if names, err = objectKeys(raw); err != nil {
			return 0, &FormatError{path + ".properties", "must be an object of schemas"}
		}
		if err := json.Unmarshal(raw, &props); err != nil {
			return 0, &FormatError{path + ".properties", "must be an object of schemas"}
		}
	}
	var required []string
	if raw, ok := s["required"]; ok {
		if err := json.Unmarshal(raw, &required); err != nil {
			return 0, &FormatError{path + ".required", "must be an array of property names"}
		}
	}
	for _, r := range required {
		if _, ok := props[r]; !ok {
			return 0, &FormatError{path + ".required", fmt.Sprintf("names %q, which is not among the properties", r)}
		}
	}
	for _, n := range names {
		if !slices.Contains(required, n) {
			return 0, &FormatError{path + ".required", fmt.Sprintf("must list every property, as OpenAI's structured outputs require; %q is missing (make it nullable with \"type\": [..., \"null\"] instead)", n)}
		}
	}
	n := node{kind: kObject}
	sep := "{"
	for _, name := range names {
		key, _ := json.Marshal(name)
		n.segs = append(n.segs, sep+string(key)+":")
		var sub map[string]json.RawMessage
		p := path + ".properties." + name
		if err := json.Unmarshal(props[name], &sub); err != nil {
			return 0, &FormatError{p, "must be a schema object"}
		}
		id, err := c.schema(sub, p, depth+1, false)
		if err != nil {
			return 0, err
		}
		n.children = append(n.children, id)
		sep = ","
	}
	if len(names) == 0 {
		n.segs = append(n.segs, "{}")
	} else {
		n.segs = append(n.segs, "}")
	}
	return c.add(n, path)
}

// objectKeys lists the keys of a JSON object in their order, each once.
func objectKeys(raw json.RawMessage) ([]string, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil, fmt.Errorf("not an object")
	}
	var keys []string
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil, err
		}
		k := t.(string)
		if slices.Contains(keys, k) {
			return nil, fmt.Errorf("property %q twice", k)
		}
		keys = append(keys, k)
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return nil, err
		}
	}
	return keys, nil
}

func (c *compiler) array(s map[string]json.RawMessage, path string, depth int, handled map[string]bool) (int32, error) {
	if depth >= MaxDepth {
		return 0, &FormatError{path, fmt.Sprintf("objects and arrays nest more than %d deep", MaxDepth)}
	}
	handled["items"], handled["minItems"], handled["maxItems"] = true, true, true
	raw, ok := s["items"]
	if !ok {
		return 0, &FormatError{path, `an array schema must give its "items"`}
	}
	var items map[string]json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return 0, &FormatError{path + ".items", "must be a schema object"}
	}
	n := node{kind: kArray, min: 0, max: -1}
	for _, b := range []struct {
		key string
		dst *int32
	}{{"minItems", &n.min}, {"maxItems", &n.max}} {
		raw, ok := s[b.key]
		if !ok {
			continue
		}
		var v int64
		if err := json.Unmarshal(raw, &v); err != nil || v < 0 || v > MaxItems {
			return 0, &FormatError{path + "." + b.key, fmt.Sprintf("must be an integer from 0 to %d, got %s", MaxItems, raw)}
		}
		*b.dst = int32(v)
	}
	if n.max >= 0 && n.min > n.max {
		return 0, &FormatError{path, fmt.Sprintf("minItems %d is above maxItems %d", n.min, n.max)}
	}
	id, err := c.schema(items, path+".items", depth+1, false)
	if err != nil {
		return 0, err
	}
	n.children = []int32{id}
	return c.add(n, path)
}
