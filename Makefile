# h3infer — the Makefile is the contract: CI calls `make test`.
SHELL := /bin/bash
GO ?= go

ORT_VERSION    := 1.24.1
ORT_TARBALL_SHA := 57181cf6e6e711b155c5b942d591fd63ded0b5de5c4922d51fd994e7f6ac2772
ORT_LIB_SHA    := 53ef1ac028dd1b05554b8da28d9159eb3876f99868193d2aaa6e67f0243c23d4
ORT_DIR        := $(CURDIR)/.cache/onnxruntime/$(ORT_VERSION)
ORT_BUNDLED    := $(ORT_DIR)/libonnxruntime.so.1
# ONNXRUNTIME_LIB, when set, names a library of the user's own and nothing is fetched.
ONNXRUNTIME_LIB ?= $(ORT_BUNDLED)
export ONNXRUNTIME_LIB

# The GPU runtime (docs/GPU.md): ONNX Runtime 1.29.0 with its CUDA and
# TensorRT providers in one folder; point onnxruntime_lib (or
# ONNXRUNTIME_LIB) at $(ORT_CUDA_LIB) to serve models on a GPU.
ORT_CUDA_DIR := $(CURDIR)/.cache/onnxruntime/1.29.0-cuda
ORT_CUDA_LIB := $(ORT_CUDA_DIR)/libonnxruntime.so.1

.PHONY: all build run test bench bench-urgency bench-gpu bench-providers test-ort-cuda fuzz fuzz-short fuzz-run ort ort-cuda js screenshot clean

all: build

build:
	$(GO) build -o bin/h3infer ./cmd/h3infer

# The binary opens the library at run time, so only run and test need it.

ort: $(ONNXRUNTIME_LIB)

$(ORT_BUNDLED):
	@scripts/fetch-onnxruntime.sh "$(ORT_VERSION)" "$(ORT_TARBALL_SHA)" "$(ORT_LIB_SHA)" "$(ORT_DIR)"

ort-cuda: $(ORT_CUDA_LIB)

$(ORT_CUDA_LIB):
	@scripts/fetch-onnxruntime-cuda.sh "$(ORT_CUDA_DIR)"

# Starts the gateway and two workers on the demo model; creates certificates,
# the model and a dev token (printed; `h3infer chat` reads it from
# .h3infer/tokens/dev.token) under .h3infer on first start.
run: ort build
	bin/h3infer serve $(ARGS)

# The JavaScript clients the end-to-end tests drive (playwright-core steering
# the system chromium, and the openai SDK), installed exactly as locked.
# Neither needs an install script; skipping them guarantees no tool fetches a
# browser of its own.
JS_DIR := cmd/h3infer/testdata/js
# The reference the tokenizer tests compare against: Hugging Face's
# tokenizers (the native binding and the JavaScript port), its Jinja
# renderer, and real models' tokenizer files.
REF_DIR := tokenize/testdata/ref
js: $(JS_DIR)/node_modules/.package-lock.json $(REF_DIR)/node_modules/.package-lock.json

%/node_modules/.package-lock.json: %/package.json %/package-lock.json
	cd $* && npm ci --ignore-scripts --no-audit --no-fund

# -race everywhere it can run; the end-to-end tests build and start the real
# binary themselves.
test: ort js
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 20m ./...
	# quic-go's client races on its peer's transport parameters when it
	# opens streams during 0-RTT (quic-go issue 4303, open upstream), so the
	# tests that run a 0-RTT client in the test process are built only
	# without the race detector (files tagged !race) and run here.
	$(GO) test -count=1 -timeout 10m -run 'ZeroRTT|SessionCache' ./gateway/ ./client/ ./internal/loadgen/ ./cmd/h3infer/
	# Every decoder and parser's fuzz target, briefly: the suite above runs
	# only their seeds.
	$(MAKE) --no-print-directory fuzz-short

# Go benchmarks, then the h3infer bench scenarios (docs/BENCHMARKS.md):
# gateway overhead against the bare server, and network conditions (netem,
# or the userspace link emulator where the kernel lacks it)
# in namespaces of its own (root), memory, and overload (the count-bounded
# queue beside the default admission).
bench: ort build
	$(GO) test -run '^$$' -bench . -benchtime 2s ./transport/ ./engine/ ./ort/ ./tokenize/ ./internal/onnxgen/
	scripts/bench.sh
	scripts/bench-defaults.sh
	scripts/bench-netem.sh
	scripts/bench-memory.sh
	scripts/bench-weights.sh
	scripts/bench-overload.sh

# The GPU section of docs/BENCHMARKS.md: a hidden-1024 model at concurrency
# 1 and 32, cpu against cuda, KV cache in host against device memory. Needs
# an NVIDIA GPU and the CUDA libraries docs/GPU.md lists.
bench-gpu: ort-cuda
	ONNXRUNTIME_LIB=$(ORT_CUDA_LIB) H3INFER_BENCH_PROVIDERS=cpu,cuda $(GO) test -run '^$$' -bench Providers -benchtime 1x ./engine/

# The CPU columns of the same benchmark, on any machine.
bench-providers: ort
	$(GO) test -run '^$$' -bench Providers -benchtime 1x ./engine/

# The tests of the worker's packages on the 1.29 core library of the GPU
# set, with the CPU provider: checks that release works with onnxruntime_go
# where no GPU is.
test-ort-cuda: ort-cuda
	ONNXRUNTIME_LIB=$(ORT_CUDA_LIB) $(GO) test -count=1 ./ort/ ./engine/ ./workerpool/

# The urgency figures in docs/BENCHMARKS.md: fairness, coalescing, and
# priority isolation through the real binary (about a minute).
bench-urgency: ort
	$(GO) test -run '^$$' -bench Fairness -benchtime 1x ./scheduler/
	$(GO) test -run '^$$' -bench Coalescing -benchtime 5x ./gateway/
	$(GO) test -run '^$$' -bench PriorityIsolation -benchtime 1x ./cmd/h3infer/

# Each fuzz target of every package for FUZZTIME (default 20s). The targets
# are found, not listed, so a new Fuzz function is fuzzed without an edit
# here; a package that does not build fails the run rather than dropping
# out of it.
FUZZTIME ?= 20s
fuzz:
	@$(MAKE) --no-print-directory fuzz-run FUZZ_FOR=$(FUZZTIME)

# The same for FUZZTIME_SHORT each, a bounded pass `make test` ends with
# (20 targets here: a minute or two once their binaries are built).
FUZZTIME_SHORT ?= 2s
fuzz-short:
	@$(MAKE) --no-print-directory fuzz-run FUZZ_FOR=$(FUZZTIME_SHORT)

# Go 1.26's fuzz coordinator can fail a target with a bare "context
# deadline exceeded" when -fuzztime ends while a worker is mid-input (Go
# issue 75804, fixed in 1.27), with no failing input. A real failure always
# writes its input under the package's testdata/fuzz/TARGET/, so a failed
# run counts only when it wrote one, or when it failed in any other way.
fuzz-run:
	@set -o pipefail; \
	targets=$$($(GO) test -list '^Fuzz' ./... | awk '/^Fuzz/ { name[++n] = $$1; next } /^ok/ { for (i = 1; i <= n; i++) print $$2, name[i]; n = 0 }') || exit 1; \
	[ -n "$$targets" ] || { echo "no fuzz targets found" >&2; exit 1; }; \
	log=$$(mktemp); trap 'rm -f "$$log"' EXIT; \
	while read -r pkg t; do \
		echo "fuzz $$pkg $$t for $(FUZZ_FOR)"; \
		corpus=$$($(GO) list -f '{{.Dir}}' $$pkg)/testdata/fuzz/$$t; \
		before=$$(ls "$$corpus" 2>/dev/null | wc -l); \
		if $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZ_FOR) $$pkg 2>&1 | tee "$$log"; then continue; fi; \
		after=$$(ls "$$corpus" 2>/dev/null | wc -l); \
		if [ "$$after" = "$$before" ] && grep -q '^    context deadline exceeded$$' "$$log" && ! grep -q 'Failing input written' "$$log"; then \
			echo "fuzz $$pkg $$t: stopped by Go's fuzztime deadline race (go.dev/issue/75804), no failing input; not a failure"; \
			continue; \
		fi; \
		exit 1; \
	done <<< "$$targets"

# Retakes docs/screenshot.png, the README's picture, with the browser test.
screenshot: ort js
	H3INFER_SCREENSHOT=$(CURDIR)/docs/screenshot.png $(GO) test -count=1 -run '^TestBrowserChatPage$$' ./cmd/h3infer/

clean:
	rm -rf bin
