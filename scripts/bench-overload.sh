#!/usr/bin/env bash
# Scenario 4 of `make bench`: overload. Two gateways with their defaults
# (two workers serving the demo ONNX model through ONNX Runtime) run on
# loopback, differing only in their scheduler section: SCHED_COUNT (the
# count-bounded queue, {"admission": "count"}) and SCHED_DEFAULT (the
# default, the time-bounded admission). One `h3infer bench --overload`
# process runs the scenario against each in turn: capacity in closed loop
# at concurrency 64, unloaded urgency-0 TTFT, an open loop at FACTOR times
# the capacity for DURATION with urgency-0 probes at 1/s beside it, then
# one request at a time for the recovery, reading each gateway's VmRSS
# every 100 ms; it prints the figures side by side. Against a tree whose
# scheduler lacks the admission key, run SCHED_COUNT='{}'.
set -euo pipefail
BIN=${BIN:-bin/h3infer}
OUT=${OUT:-bench-out}
SCHED_COUNT=${SCHED_COUNT:-'{"admission": "count"}'}
SCHED_DEFAULT=${SCHED_DEFAULT:-'{}'}
FACTOR=${FACTOR:-5}
DURATION=${DURATION:-15s}
CAPACITY_DURATION=${CAPACITY_DURATION:-10s}
mkdir -p "$OUT"
count=$(mktemp -d)
default=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$count" "$default"
}
trap cleanup EXIT
# start NAME DIR PORT ADMIN SCHED: a gateway with its defaults but SCHED,
# logging to $OUT/overload-NAME-serve.log.
start() {
	local name=$1
	shift
	"$BIN" certs init --state-dir "$1" >/dev/null
	cat >"$1/config.json" <<JSON
{"listen": "127.0.0.1:$2", "admin": "127.0.0.1:$3", "state_dir": "$1", "scheduler": $4}
JSON
	"$BIN" serve --config "$1/config.json" >"$OUT/overload-$name-serve.log" 2>&1 & pids+=($!)
}
start count "$count" 28843 29490 "$SCHED_COUNT"
count_pid=$!
start default "$default" 28943 29590 "$SCHED_DEFAULT"
default_pid=$!
ready() { grep -q "is ready" "$OUT/overload-count-serve.log" && grep -q "is ready" "$OUT/overload-default-serve.log"; }
for _ in $(seq 150); do ready && break; sleep 0.2; done
ready || { echo "a gateway did not start; see $OUT/overload-*-serve.log" >&2; exit 1; }
echo "== scenario 4: overload at ${FACTOR}x capacity for $DURATION; count: $SCHED_COUNT, default: $SCHED_DEFAULT"
"$BIN" bench --overload --overload-factor "$FACTOR" --overload-duration "$DURATION" \
	--overload-capacity-duration "$CAPACITY_DURATION" \
	--url https://127.0.0.1:28843 --label count --ca "$count/certs/ca.pem" --state-dir "$count" --overload-pid "$count_pid" \
	--baseline-url https://127.0.0.1:28943 --baseline-label default --baseline-state-dir "$default" --overload-baseline-pid "$default_pid" \
	--prompt-words 32 --output-tokens 64 --json "$OUT/overload.json" | tee "$OUT/overload.txt"
