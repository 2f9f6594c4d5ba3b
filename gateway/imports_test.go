package gateway

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestImports keeps the gateway away from the worker process's internals:
// it reaches workers only through the scheduler.
func TestImports(t *testing.T) {
	forbidden := []string{"h3infer/backend", "github.com/yalue/onnxruntime_go"}
	for imp, via := range projectImports(t, "h3infer/gateway") {
		for _, f := range forbidden {
			if imp == strings.TrimSuffix(f, "/") || strings.HasPrefix(imp, f) {
				t.Errorf("%s imports %s", via, imp)
			}
		}
	}
}

// projectImports returns every import reachable from pkg through packages of
// this module (non-test files only), each with the package that imports it.
func projectImports(t *testing.T, pkg string) map[string]string {
	t.Helper()
	const module = "h3infer"
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("module root: %v", err)
	}
	seen := map[string]string{}
	queue := []string{pkg}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		dir := filepath.Join(root, strings.TrimPrefix(p, module))
		files, err := filepath.Glob(filepath.Join(dir, "*.go"))
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range files {
			if strings.HasSuffix(name, "_test.go") {
				continue
			}
			f, err := parser.ParseFile(token.NewFileSet(), name, nil, parser.ImportsOnly)
			if err != nil {
				t.Fatal(err)
			}
			for _, spec := range f.Imports {
				imp, _ := strconv.Unquote(spec.Path.Value)
				if _, ok := seen[imp]; ok {
					continue
				}
				seen[imp] = p
				if strings.HasPrefix(imp, module+"/") {
					queue = append(queue, imp)
				}
			}
		}
	}
	return seen
}
