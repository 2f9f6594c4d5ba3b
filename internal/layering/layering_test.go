package layering

import (
	"encoding/json"
	"io"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

type pkg struct {
	ImportPath string
	Imports    []string
	Deps       []string
}

// forbidden lists, per package, what it must not import directly (Imports)
// and what must not appear anywhere below it (Deps).
var forbidden = map[string]struct{ direct, anywhere []string }{
	"h3infer/scheduler": {
		direct:   []string{"h3infer/gateway", "h3infer/workerpool", "h3infer/engine", "h3infer/ort", "h3infer/tokenize", "h3infer/cmd/h3infer"},
		anywhere: []string{"net/http", "github.com/quic-go/quic-go", "github.com/yalue/onnxruntime_go", "h3infer/transport"},
	},
	"h3infer/transport": {
		direct:   []string{"h3infer/gateway", "h3infer/workerpool", "h3infer/engine", "h3infer/ort", "h3infer/scheduler"},
		anywhere: []string{"net/http", "github.com/quic-go/quic-go", "github.com/yalue/onnxruntime_go"},
	},
	// The gateway reaches workers only through the scheduler and the
	// shared vocabulary: it knows no carrier and no pool.
	"h3infer/gateway": {
		direct:   []string{"h3infer/workerpool", "h3infer/engine", "h3infer/ort", "h3infer/tokenize", "h3infer/workerconf", "h3infer/cmd/h3infer"},
		anywhere: []string{"github.com/yalue/onnxruntime_go", "h3infer/transport"},
	},
	// The supervisor runs in the gateway process and runs no model: the
	// worker process's packages stay out of it, ONNX Runtime (cgo) above
	// all; what it tells a worker is workerconf's.
	"h3infer/workerpool": {
		direct:   []string{"h3infer/gateway", "h3infer/scheduler", "h3infer/engine", "h3infer/ort", "h3infer/tokenize", "h3infer/cmd/h3infer"},
		anywhere: []string{"github.com/quic-go/quic-go", "github.com/yalue/onnxruntime_go", "h3infer/engine", "h3infer/ort"},
	},
	// The worker's loop drives models through its own interface; ONNX
	// Runtime is injected by the command, never linked here, so the
	// synthetic model and a real one run the same loop.
	"h3infer/engine": {
		direct:   []string{"h3infer/gateway", "h3infer/scheduler", "h3infer/workerpool", "h3infer/ort", "h3infer/cmd/h3infer"},
		anywhere: []string{"github.com/quic-go/quic-go", "github.com/yalue/onnxruntime_go", "h3infer/ort", "h3infer/workerpool"},
	},
	// ONNX Runtime's models implement engine's interface without knowing
	// engine, the ring or the gateway.
	"h3infer/ort": {
		direct:   []string{"h3infer/gateway", "h3infer/scheduler", "h3infer/workerpool", "h3infer/engine", "h3infer/transport", "h3infer/cmd/h3infer"},
		anywhere: []string{"github.com/quic-go/quic-go", "net/http", "h3infer/transport", "h3infer/engine"},
	},
	"h3infer/tokenize": {
		direct:   []string{"h3infer/gateway", "h3infer/scheduler", "h3infer/workerpool", "h3infer/engine", "h3infer/ort", "h3infer/transport", "h3infer/workerconf"},
		anywhere: []string{"github.com/quic-go/quic-go", "github.com/yalue/onnxruntime_go", "net/http"},
	},
	// The gateway process's copy of the workers' tokenizers, for
	// /tokenize: it reads model files as the worker does, but runs no
	// model and knows neither the gateway nor the pool.
	"h3infer/tokenizers": {
		direct:   []string{"h3infer/gateway", "h3infer/scheduler", "h3infer/workerpool", "h3infer/engine", "h3infer/ort", "h3infer/transport", "h3infer/cmd/h3infer"},
		anywhere: []string{"github.com/quic-go/quic-go", "github.com/yalue/onnxruntime_go", "net/http", "h3infer/engine", "h3infer/ort"},
	},
	// Both processes read the worker's settings, so they carry neither
	// process's machinery.
	"h3infer/workerconf": {
		direct:   []string{"h3infer/gateway", "h3infer/scheduler", "h3infer/workerpool", "h3infer/engine", "h3infer/ort", "h3infer/transport"},
		anywhere: []string{"github.com/quic-go/quic-go", "github.com/yalue/onnxruntime_go", "net/http", "h3infer/transport"},
	},
	"h3infer/ratelimit": {
		direct:   []string{"h3infer/gateway", "h3infer/workerpool", "h3infer/engine", "h3infer/scheduler", "h3infer/cmd/h3infer"},
		anywhere: []string{"github.com/quic-go/quic-go", "github.com/yalue/onnxruntime_go"},
	},
	"h3infer/tlsbind": {direct: []string{"h3infer/gateway", "h3infer/workerpool", "h3infer/engine", "h3infer/scheduler"}},
	"h3infer/certs":   {direct: []string{"h3infer/gateway", "h3infer/workerpool", "h3infer/engine", "h3infer/scheduler"}},
	// The chat page talks to the gateway only through the public API.
	"h3infer/web": {anywhere: []string{"h3infer/gateway", "h3infer/scheduler", "h3infer/transport", "h3infer/workerpool", "h3infer/engine", "h3infer/ort", "net/http"}},
	// The link emulator is bench tooling that stands alone.
	"h3infer/internal/netemu": {anywhere: []string{"h3infer/gateway", "h3infer/scheduler", "h3infer/transport", "h3infer/workerpool", "h3infer/engine", "h3infer/ort", "h3infer/client", "net/http", "github.com/quic-go/quic-go"}},
	// qlog files are a concern of the commands that open them: the
	// gateway and the client take a tracer function, not a directory.
	"h3infer/internal/qlogdir": {anywhere: []string{"h3infer/gateway", "h3infer/scheduler", "h3infer/transport", "h3infer/workerpool", "h3infer/engine", "h3infer/ort", "h3infer/client", "h3infer/upstream"}},
	// The client is what apps embed: it carries nothing of the server.
	// Remote servers are reached over HTTP, never through the worker
	// ring or ONNX Runtime.
	"h3infer/upstream": {anywhere: []string{"github.com/yalue/onnxruntime_go", "h3infer/transport", "h3infer/workerpool", "h3infer/engine", "h3infer/ort", "h3infer/gateway"}},
	"h3infer/client": {
		direct:   []string{"h3infer/gateway", "h3infer/workerpool", "h3infer/engine", "h3infer/ort", "h3infer/scheduler", "h3infer/certs"},
		anywhere: []string{"github.com/yalue/onnxruntime_go", "github.com/redis/go-redis/v9"},
	},
}

// onlyImports lists, for packages that join the graph at its edge, the
// only packages of h3infer's they may import directly.
var onlyImports = map[string][]string{
	// A backend kind of its own: it speaks the vocabulary and implements
	// the scheduler's Backend; cmd/h3infer wires it in.
	"h3infer/upstream": {"h3infer/infer", "h3infer/priority", "h3infer/config", "h3infer/scheduler"},
}

// vocabulary lists the packages every other one speaks, and which of
// h3infer's packages each may import: they are the leaves of the graph.
var vocabulary = map[string][]string{
	"h3infer/priority": nil,
	"h3infer/infer":    {"h3infer/priority"},
	// How a setting is written in the configuration file, which every
	// library's Config speaks.
	"h3infer/config": nil,
	// Schemas and token masks of structured outputs, which the gateway
	// checks and the worker enforces.
	"h3infer/constrain": nil,
	// How model families write tool calls, which the worker parses and
	// constrains and the gateway names.
	"h3infer/toolcall": {"h3infer/infer", "h3infer/priority"},
}

func TestImportGraph(t *testing.T) {
	out, err := exec.Command("go", "list", "-e", "-json", "h3infer/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	seen := map[string]bool{}
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		seen[p.ImportPath] = true
		rule := forbidden[p.ImportPath]
		for _, bad := range rule.direct {
			if slices.Contains(p.Imports, bad) {
				t.Errorf("%s imports %s; ARCHITECTURE.md forbids that edge", p.ImportPath, bad)
			}
		}
		for _, bad := range rule.anywhere {
			for _, d := range p.Deps {
				if d == bad || strings.HasPrefix(d, bad+"/") {
					t.Errorf("%s depends on %s (through its imports); it must stay free of it", p.ImportPath, d)
					break
				}
			}
		}
		if allowed, ok := vocabulary[p.ImportPath]; ok {
			for _, d := range p.Imports {
				if strings.HasPrefix(d, "h3infer/") && !slices.Contains(allowed, d) {
					t.Errorf("%s imports %s; the vocabulary imports nothing of ours but %v", p.ImportPath, d, allowed)
				}
			}
		}
		if allowed, ok := onlyImports[p.ImportPath]; ok {
			for _, d := range p.Imports {
				if strings.HasPrefix(d, "h3infer/") && !slices.Contains(allowed, d) {
					t.Errorf("%s imports %s; it may import nothing of ours but %v", p.ImportPath, d, allowed)
				}
			}
		}
		// Only the command wires the top-level packages together: the
		// gateway, and ONNX Runtime's models into the worker's loop (the
		// tests of engine and workerpool import ort too, to drive real
		// models; go list's Imports leaves test files out).
		for _, wired := range []string{"h3infer/gateway", "h3infer/ort"} {
			if p.ImportPath != "h3infer/cmd/h3infer" && slices.Contains(p.Imports, wired) {
				t.Errorf("%s imports %s; only cmd/h3infer may", p.ImportPath, wired)
			}
		}
	}
	for name := range vocabulary {
		if !seen[name] {
			t.Errorf("package %s is missing from the module; update this test with the layout", name)
		}
	}
	for name := range onlyImports {
		if !seen[name] {
			t.Errorf("package %s is missing from the module; update this test with the layout", name)
		}
	}
	for name := range forbidden {
		if !seen[name] {
			t.Errorf("package %s is missing from the module; update this test with the layout", name)
		}
	}
}
