package constrain

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

// schemas are the test's json_schema formats: each kind of schema the
// subset supports.
var schemas = map[string]string{
	"flat": `{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"},"score":{"type":"number"},
		"ok":{"type":"boolean"},"none":{"type":"null"}},"required":["name","age","score","ok","none"],"additionalProperties":false}`,
	"nested": `{"type":"object","properties":{"user":{"type":"object","properties":{"id":{"type":"integer"},
		"tags":{"type":"array","items":{"type":"string"},"maxItems":3}},"required":["id","tags"],"additionalProperties":false},
		"color":{"enum":["red","green","blue"]}},"required":["user","color"],"additionalProperties":false}`,
	"anyof": `{"type":"object","properties":{"v":{"anyOf":[{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":false},
		{"type":"object","properties":{"a":{"type":"string"}},"required":["a"],"additionalProperties":false},{"type":"null"}]},
		"n":{"type":["number","null"]}},"required":["v","n"],"additionalProperties":false}`,
	"arrays": `{"type":"object","properties":{"pts":{"type":"array","minItems":2,"maxItems":4,"items":{"type":"array","items":{"type":"number"},"minItems":1}},
		"c":{"const":{"k":[1,"x"]}}},"required":["pts","c"],"additionalProperties":false}`,
	"defs": `{"type":"object","$defs":{"step":{"type":"object","properties":{"explanation":{"type":"string"},"output":{"type":"string"}},
		"required":["explanation","output"],"additionalProperties":false}},"properties":{"steps":{"type":"array","items":{"$ref":"#/$defs/step"}},
		"final_answer":{"type":"string"}},"required":["steps","final_answer"],"additionalProperties":false}`,
	"empty": `{"type":"object","properties":{},"additionalProperties":false}`,
}

func jsonSchemaFormat(schema string) string {
	return `{"type":"json_schema","json_schema":{"name":"t","strict":true,"schema":` + schema + `}}`
}

func mustParse(t testing.TB, format string) *Grammar {
	t.Helper()
	g, err := Parse([]byte(format))
	if err != nil {
		t.Fatalf("Parse(%s): %v", format, err)
	}
	return g
}

func validator(t testing.TB, schema string) *jsonschema.Schema {
	t.Helper()
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(schema))
	if err != nil {
		t.Fatal(err)
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource("schema.json", doc); err != nil {
		t.Fatal(err)
	}
	s, err := c.Compile("schema.json")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestMatchDocuments(t *testing.T) {
	for _, tc := range []struct {
		name, schema, doc string
		want              string // "complete", "prefix" or "dead"
	}{
		{"flat", "flat", `{"name":"Ann \"A\" \u00e9 ü","age":-12,"score":1.5e+10,"ok":true,"none":null}`, "complete"},
		{"flat prefix", "flat", `{"name":"Ann","age":12`, "prefix"},
		{"flat wrong order", "flat", `{"age":12`, "dead"},
		{"flat space", "flat", `{ "name"`, "dead"},
		{"flat leading zero", "flat", `{"name":"","age":01`, "dead"},
		{"integer fraction", "flat", `{"name":"","age":1.`, "dead"},
		{"control char", "flat", "{\"name\":\"a\n", "dead"},
		{"bad escape", "flat", `{"name":"\x`, "dead"},
		{"overlong utf8", "flat", "{\"name\":\"\xc0\x80", "dead"},
		{"surrogate utf8", "flat", "{\"name\":\"\xed\xa0\x80", "dead"},
		{"trailing", "empty", `{} `, "dead"},
		{"empty", "empty", `{}`, "complete"},
		{"enum", "nested", `{"user":{"id":0,"tags":["a","b","c"]},"color":"green"}`, "complete"},
		{"enum other", "nested", `{"user":{"id":0,"tags":[]},"color":"gre`, "prefix"},
		{"enum not", "nested", `{"user":{"id":0,"tags":[]},"color":"grey`, "dead"},
		{"maxItems", "nested", `{"user":{"id":0,"tags":["a","b","c",`, "dead"},
		{"anyOf int", "anyof", `{"v":{"a":1},"n":null}`, "complete"},
		{"anyOf string", "anyof", `{"v":{"a":"x"},"n":2}`, "complete"},
		{"anyOf null", "anyof", `{"v":null,"n":-0.5}`, "complete"},
		{"anyOf neither", "anyof", `{"v":{"a":t`, "dead"},
		{"minItems", "arrays", `{"pts":[[1]]`, "dead"},
		{"minItems met", "arrays", `{"pts":[[1],[2,3]],"c":{"k":[1,"x"]}}`, "complete"},
		{"inner minItems", "arrays", `{"pts":[[]`, "dead"},
		{"const", "arrays", `{"pts":[[1],[2]],"c":{"k":[1,"y"`, "dead"},
		{"defs", "defs", `{"steps":[{"explanation":"e","output":"o"}],"final_answer":"42"}`, "complete"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := mustParse(t, jsonSchemaFormat(schemas[tc.schema]))
			if got := stateName(g.Advance(g.Start(), tc.doc)); got != tc.want {
				t.Errorf("%s: got %s, want %s", tc.doc, got, tc.want)
			}
		})
	}
}

func TestMatchJSONObject(t *testing.T) {
	g := mustParse(t, `{"type":"json_object"}`)
	for doc, want := range map[string]bool{
		`{}`: true, `{"a":[1,{"b":[]},"x",true,false,null,-0.0e1]}`: true, `[]`: false, `"x"`: false,
		`{"a":1,}`: false, `{"a"}`: false, `{,}`: false, `{"a":[1,]}`: false,
	} {
		s := g.Advance(g.Start(), doc)
		if got := s.Complete(); got != want {
			t.Errorf("%s: complete %v, want %v", doc, got, want)
		}
	}
	deep := strings.Repeat(`{"a":`, MaxDepth)
	if s := g.Advance(g.Start(), deep+"1"); s.Dead() {
		t.Errorf("%d levels refused", MaxDepth)
	}
	if s := g.Advance(g.Start(), deep+"{"); !s.Dead() {
		t.Errorf("%d levels accepted, want at most %d", MaxDepth+1, MaxDepth)
	}
}

// randomDocument writes a document of g byte by byte, each byte drawn
// from those the state allows, preferring to close what is open once the
// text grows, as a random model's output would.
func randomDocument(t *testing.T, g *Grammar, rng *rand.Rand) string {
	t.Helper()
	s := g.Start()
	var out []byte
	var buf []thread
	for !s.Complete() {
		var allowed []byte
		for b := range 256 {
			if next, _ := g.step(s, byte(b), buf[:0]); !next.Dead() {
				allowed = append(allowed, byte(b))
			}
		}
		if len(allowed) == 0 {
			t.Fatalf("dead end after %q", out)
		}
		b := allowed[rng.IntN(len(allowed))]
		if len(out) > 40 {
			for _, c := range []byte(`"]}`) {
				if i := strings.IndexByte(string(allowed), c); i >= 0 && rng.IntN(2) == 0 {
					b = c
				}
			}
		}
		if len(out) > 5000 {
			t.Fatalf("no end in sight: %q", out)
		}
		s, buf = g.step(s, b, buf[:0])
		out = append(out, b)
	}
	return string(out)
}

func TestRandomDocumentsValidate(t *testing.T) {
	for name, schema := range schemas {
		t.Run(name, func(t *testing.T) {
			g := mustParse(t, jsonSchemaFormat(schema))
			v := validator(t, schema)
			rng := rand.New(rand.NewPCG(1, 2))
			for range 200 {
				doc := randomDocument(t, g, rng)
				val, err := jsonschema.UnmarshalJSON(strings.NewReader(doc))
				if err != nil {
					t.Fatalf("%q: %v", doc, err)
				}
				if err := v.Validate(val); err != nil {
					t.Fatalf("%q: %v", doc, err)
				}
			}
		})
	}
}

func TestRefused(t *testing.T) {
	for _, tc := range []struct {
		name, format, path, msg string
	}{
		{"type", `{"type":"xml"}`, "response_format.type", "must be"},
		{"unknown field", `{"type":"json_object","x":1}`, "response_format", "unknown field"},
		{"schema with json_object", `{"type":"json_object","json_schema":{}}`, "response_format.json_schema", "only allowed"},
		{"no name", `{"type":"json_schema","json_schema":{"schema":{"type":"object"}}}`, "response_format.json_schema.name", "must be"},
		{"no schema", `{"type":"json_schema","json_schema":{"name":"x"}}`, "response_format.json_schema.schema", "required"},
		{"root string", jsonSchemaFormat(`{"type":"string"}`), "response_format.json_schema.schema", "root must be an object"},
		{"root anyOf", jsonSchemaFormat(`{"anyOf":[{"type":"object","properties":{}}]}`), "response_format.json_schema.schema", "root must be an object"},
		{"patternProperties", jsonSchemaFormat(`{"type":"object","properties":{"x":{"type":"object","patternProperties":{}}},"required":["x"]}`),
			"response_format.json_schema.schema.properties.x", `"patternProperties" is not supported`},
		{"pattern", jsonSchemaFormat(`{"type":"object","properties":{"x":{"type":"string","pattern":"a+"}},"required":["x"]}`),
			"response_format.json_schema.schema.properties.x", `"pattern" is not supported`},
		{"minimum", jsonSchemaFormat(`{"type":"object","properties":{"x":{"type":"number","minimum":1}},"required":["x"]}`),
			"response_format.json_schema.schema.properties.x", `"minimum" is not supported`},
		{"optional", jsonSchemaFormat(`{"type":"object","properties":{"x":{"type":"number"}}}`),
			"response_format.json_schema.schema.required", `"x" is missing`},
		{"additional", jsonSchemaFormat(`{"type":"object","properties":{},"additionalProperties":true}`),
			"response_format.json_schema.schema.additionalProperties", "must be false"},
		{"no type", jsonSchemaFormat(`{"type":"object","properties":{"x":{}},"required":["x"]}`),
			"response_format.json_schema.schema.properties.x", "must say its"},
		{"no items", jsonSchemaFormat(`{"type":"object","properties":{"x":{"type":"array"}},"required":["x"]}`),
			"response_format.json_schema.schema.properties.x", "items"},
		{"recursion", jsonSchemaFormat(`{"type":"object","$defs":{"n":{"type":"object","properties":{"k":{"$ref":"#/$defs/n"}},"required":["k"]}},
			"properties":{"x":{"$ref":"#/$defs/n"}},"required":["x"]}`), "response_format.json_schema.schema.properties.x.$ref(#/$defs/n).properties.k.$ref", "recursive"},
		{"root ref", jsonSchemaFormat(`{"type":"object","properties":{"x":{"$ref":"#"}},"required":["x"]}`), "response_format.json_schema.schema.properties.x.$ref", "recursive"},
		{"remote ref", jsonSchemaFormat(`{"type":"object","properties":{"x":{"$ref":"http://x/y"}},"required":["x"]}`), "response_format.json_schema.schema.properties.x.$ref", "only #"},
		{"enum type", jsonSchemaFormat(`{"type":"object","properties":{"x":{"type":"string","enum":["a",1]}},"required":["x"]}`), "response_format.json_schema.schema.properties.x.enum[1]", "not of the schema's type"},
		{"min above max", jsonSchemaFormat(`{"type":"object","properties":{"x":{"type":"array","items":{"type":"null"},"minItems":3,"maxItems":2}},"required":["x"]}`), "response_format.json_schema.schema.properties.x", "above maxItems"},
		{"deep", jsonSchemaFormat(strings.Repeat(`{"type":"object","required":["x"],"properties":{"x":`, MaxDepth+1) + `{"type":"null"}` + strings.Repeat(`}}`, MaxDepth+1)),
			"", "nest more than"},
		{"huge", jsonSchemaFormat(`{"type":"object","description":"` + strings.Repeat("x", MaxFormatBytes) + `"}`), "response_format", "at most"},
		{"many enum values", jsonSchemaFormat(`{"type":"object","properties":{"x":{"enum":[` + strings.Repeat(`1,`, MaxEnumValues) + `1]}},"required":["x"]}`), "response_format.json_schema.schema.properties.x", "enum and const values"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, err := Parse([]byte(tc.format))
			fe, ok := err.(*FormatError)
			if !ok {
				t.Fatalf("got %v, %v; want a *FormatError", g, err)
			}
			if tc.path != "" && fe.Path != tc.path || !strings.Contains(fe.Message, tc.msg) {
				t.Errorf("got %q, want path %q and a message with %q", fe.Error(), tc.path, tc.msg)
			}
		})
	}
}

func TestDeepDiamondRefsBounded(t *testing.T) {
	// Each definition refers to the next twice: inlined, 2^30 nodes.
	var defs []string
	for i := range 30 {
		defs = append(defs, fmt.Sprintf(`"d%d":{"type":"object","properties":{"a":{"$ref":"#/$defs/d%d"},"b":{"$ref":"#/$defs/d%d"}},"required":["a","b"]}`, i, i+1, i+1))
	}
	defs = append(defs, `"d30":{"type":"null"}`)
	schema := `{"type":"object","$defs":{` + strings.Join(defs, ",") + `},"properties":{"x":{"$ref":"#/$defs/d0"}},"required":["x"]}`
	if _, err := Parse([]byte(jsonSchemaFormat(schema))); err == nil {
		t.Fatal("a schema of 2^30 parts was accepted")
	}
}

func TestText(t *testing.T) {
	g, err := Parse([]byte(`{"type":"text"}`))
	if g != nil || err != nil {
		t.Errorf("got %v, %v; want nil, nil", g, err)
	}
}

// testVocab is a byte-level vocabulary with some longer pieces; id 0 ends
// the sequence and id 1 is a special token that adds nothing.
func testVocab(t testing.TB) (*Vocab, []string) {
	pieces := []string{"<eos>", ""}
	for b := range 256 {
		pieces = append(pieces, string([]byte{byte(b)}))
	}
	pieces = append(pieces, `{"`, `":`, `",`, `"}`, `name`, `age`, ` the`, `true`, `12`, `.5`, `e+`, `"}]`, "é", "\xc3", `{}`, `[]`, `null`, `},{"`)
	v, err := NewVocab(len(pieces), func(id int) (string, bool) { return pieces[id], id == 0 })
	if err != nil {
		t.Fatal(err)
	}
	return v, pieces
}

func TestMaskMatchesAccept(t *testing.T) {
	v, pieces := testVocab(t)
	for name, schema := range schemas {
		g := mustParse(t, jsonSchemaFormat(schema))
		rng := rand.New(rand.NewPCG(3, 4))
		for range 20 {
			m := NewMatcher(g, v)
			text := ""
			for step := 0; ; step++ {
				mask := m.Allowed()
				var allowed []int
				for id := range pieces {
					bit := mask[id/64]>>(id%64)&1 == 1
					probe := *m
					if ok := probe.Accept(id); ok != bit {
						t.Fatalf("%s: token %q: mask says %v, Accept says %v", name, pieces[id], bit, ok)
					}
					if bit {
						allowed = append(allowed, id)
					}
				}
				if len(allowed) == 0 {
					t.Fatalf("%s: dead end", name)
				}
				if m.Complete() {
					if len(allowed) != 1 || allowed[0] != 0 {
						t.Fatalf("%s: complete document allows %v, want only the end token", name, allowed)
					}
					break
				}
				if mask[0]&1 != 0 {
					t.Fatalf("%s: end token allowed before the document is complete", name)
				}
				id := allowed[rng.IntN(len(allowed))]
				if step > 200 {
					// Close what is open.
					for _, c := range []int{2 + '0', 2 + '}', 2 + ']', 2 + '"'} {
						if mask[c/64]>>(c%64)&1 == 1 {
							id = c
						}
					}
				}
				if step > 2000 {
					t.Fatalf("%s: no end: %q", name, text)
				}
				m.Accept(id)
				text += pieces[id]
			}
		}
	}
}

func TestVocabNeedsBytes(t *testing.T) {
	pieces := []string{"<eos>", "{", "}"}
	if _, err := NewVocab(len(pieces), func(id int) (string, bool) { return pieces[id], id == 0 }); err == nil {
		t.Error("a vocabulary that cannot spell JSON was accepted")
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range schemas {
		f.Add([]byte(jsonSchemaFormat(s)))
	}
	f.Add([]byte(`{"type":"json_object"}`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		g, err := Parse(raw)
		if err != nil || g == nil {
			return
		}
		// Whatever compiles has a start that is neither dead nor, with
		// an object at the root, complete, and accepts its own root.
		s := g.Start()
		if s.Dead() || s.Complete() {
			t.Fatalf("start dead %v, complete %v", s.Dead(), s.Complete())
		}
		var buf []thread
		if next, _ := g.step(s, '{', buf); next.Dead() {
			t.Fatal("the root object does not open with {")
		}
		_ = json.Valid(raw)
	})
}
