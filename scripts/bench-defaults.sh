#!/usr/bin/env bash
# Scenario 1b of `make bench`: what a user gets from `serve` with no
# tuning. One gateway whose config names only its addresses and one worker
# (the rest is every default: the embedded demo model through ONNX
# Runtime, slots derived from the KV budget) is loaded by `h3infer bench`
# in closed loop at concurrency 1 and 32, ROUNDS times; each round prints
# tokens/s at 32 over tokens/s at 1 (target >= 4). Beside it, the same
# ratio for one worker alone, without the gateway
# (engine.BenchmarkWorkerConcurrency, model=demo, x_c1 at c=32): the
# ceiling the gateway's figure is read against. The target is read at
# that benchmark's workload, prompts of a few words (SHORT, 4 words) and
# 64 tokens each. Each round also runs LONG-word prompts (32, the bench's
# default), where the worker spends most of its time prefilling each
# prompt alone and concurrency buys less. docs/BENCHMARKS.md, "Slots
# from the KV budget", quotes a run.
set -euo pipefail
BIN=${BIN:-bin/h3infer}
OUT=${OUT:-bench-out}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8s}
SHORT=${SHORT:-4}
LONG=${LONG:-32}
GO=${GO:-go}
mkdir -p "$OUT"
state=$(mktemp -d)
pid=
cleanup() {
	if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
	rm -rf "$state"
}
trap cleanup EXIT
"$BIN" certs init --state-dir "$state" >/dev/null
cat >"$state/config.json" <<JSON
{"listen": "127.0.0.1:28543", "admin": "127.0.0.1:29190", "state_dir": "$state",
 "workers": {"count": 1}}
JSON
"$BIN" serve --config "$state/config.json" >"$OUT/defaults-serve.log" 2>&1 & pid=$!
for _ in $(seq 300); do grep -q "is ready" "$OUT/defaults-serve.log" && break; sleep 0.2; done
grep -q "is ready" "$OUT/defaults-serve.log" || { echo "gateway did not start" >&2; cat "$OUT/defaults-serve.log" >&2; exit 1; }
echo "== scenario 1b, the default configuration, one worker: what the gateway chose"
grep -E 'slots|workers' "$OUT/defaults-serve.log" | head -3
# tps LEVEL FILE: the tokens/s bench printed for LEVEL.
tps() { awk -v c="concurrency $1:" 'index($0, c) { on = 1 } on && /^throughput:/ { print $2; exit }' "$2"; }
# ratio WORDS ROUND: one bench run of WORDS-word prompts at both levels;
# prints its line and, last, the ratio.
ratio() {
	local out="$OUT/defaults-$1w-$2.txt" one many
	"$BIN" bench --url https://127.0.0.1:28543 --ca "$state/certs/ca.pem" --state-dir "$state" \
		--concurrency 1,32 --duration "$DURATION" --requests 1000000 \
		--prompt-words "$1" --output-tokens 64 >"$out"
	one=$(tps 1 "$out")
	many=$(tps 32 "$out")
	awk -v a="$many" -v b="$one" -v w="$1" -v r="$2" 'BEGIN {
		printf "round %d, %d-word prompts: tokens/s at c=1 %s, at c=32 %s, c32/c1 %.2f\n", r, w, b, a, a / b > "/dev/stderr"
		printf "%.2f\n", a / b }'
}
short=() long=()
for r in $(seq "$ROUNDS"); do
	short+=("$(ratio "$SHORT" "$r")")
	long+=("$(ratio "$LONG" "$r")")
done 2>&1
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
worker=$("$GO" test -run '^$' -bench 'WorkerConcurrency/model=demo/c=(1|32)$' -benchtime 1x ./engine/ |
	awk '/c=32/ { for (i = 1; i < NF; i++) if ($(i + 1) == "x_c1") print $i }')
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
echo "== scenario 1b: tokens/s c32/c1 through the gateway, defaults, one worker"
echo "$SHORT-word prompts: median $(median "${short[@]}") of ${short[*]} (target >= 4); one worker alone, its benchmark's prompts: ${worker:-?}"
echo "$LONG-word prompts: median $(median "${long[@]}") of ${long[*]} (no target: each prompt is prefilled alone)"
