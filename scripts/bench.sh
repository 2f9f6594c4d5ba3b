#!/usr/bin/env bash
# Scenario 1 of `make bench`: the gateway's overhead. A gateway whose
# workers serve the synthetic model (no model cost) and the bare quic-go
# comparison server run side by side on loopback; one `h3infer bench` run
# loads both at each concurrency level and prints the ratios, with the
# CPU each server's processes (the gateway's workers included) used per
# token, read from /proc. Repeated REPS times; docs/BENCHMARKS.md quotes
# the medians. Before and after the load, the gateway's idle CPU: its
# workers attached, no requests, over IDLE seconds. CONC and REQUESTS
# change the levels and the requests per level (scripts/bench-ab.sh runs
# this script with one level).
set -euo pipefail
BIN=${BIN:-bin/h3infer}
REPS=${REPS:-3}
OUT=${OUT:-bench-out}
CONC=${CONC:-1,64,256}
REQUESTS=${REQUESTS:-1024}
IDLE=${IDLE:-5}
mkdir -p "$OUT"
state=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$state"
}
trap cleanup EXIT
"$BIN" certs init --state-dir "$state" >/dev/null
cat >"$state/synthetic.json" <<JSON
{"listen": "127.0.0.1:28443", "admin": "127.0.0.1:29090", "state_dir": "$state",
 "workers": {"count": 2, "slots": 256}, "scheduler": {"max_queue": 1024},
 "models": [{"name": "demo", "dir": "synthetic"}]}
JSON
"$BIN" serve --config "$state/synthetic.json" >"$OUT/serve.log" 2>&1 & pids+=($!)
gw=$!
"$BIN" bench --bare-listen 127.0.0.1:28444 --state-dir "$state" >"$OUT/bare.log" 2>&1 & pids+=($!)
bare=$!
for _ in $(seq 100); do
	grep -q "is ready" "$OUT/serve.log" && grep -q listening "$OUT/bare.log" && break
	sleep 0.2
done
# Nanoseconds a process's threads have run (/proc/PID/task/*/schedstat,
# exact where /proc/PID/stat counts 10 ms ticks).
runtime_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
# The gateway process alone and with its workers, over IDLE seconds.
idle_cpu() {
	local workers w g0 g1 a0=0 a1=0
	workers=$(cat /proc/"$gw"/task/*/children)
	g0=$(runtime_ns "$gw")
	for w in $workers; do a0=$((a0 + $(runtime_ns "$w"))); done
	sleep "$IDLE"
	g1=$(runtime_ns "$gw")
	for w in $workers; do a1=$((a1 + $(runtime_ns "$w"))); done
	awk -v g=$((g1 - g0)) -v a=$((a1 - a0)) -v s="$IDLE" -v n="$(echo $workers | wc -w)" -v when="$1" 'BEGIN {
		printf "idle cpu %s: gateway %.2f%% of a core (target <= 1%%), its %d workers %.2f%%, over %d s\n", when, g / s / 1e7, n, a / s / 1e7, s }'
}
sleep 1
idle_cpu "after start" | tee "$OUT/idle.txt"
# A build from before the CPU flags (scripts/bench-ab.sh runs old builds)
# is measured without them.
cpu_flags=()
if grep -q -- -cpu-pid <<<"$("$BIN" bench -h 2>&1 || true)"; then
	cpu_flags=(--cpu-pid "$gw" --baseline-cpu-pid "$bare")
fi
for i in $(seq "$REPS"); do
	echo "== scenario 1, repetition $i"
	"$BIN" bench --url https://127.0.0.1:28443 --baseline-url https://127.0.0.1:28444 \
		--ca "$state/certs/ca.pem" --state-dir "$state" --concurrency "$CONC" --requests "$REQUESTS" --duration 15s \
		"${cpu_flags[@]}" \
		--prompt-words 32 --output-tokens 64 --json "$OUT/overhead-$i.json" --plot "$OUT/overhead-$i" \
		| tee "$OUT/overhead-$i.txt"
done
idle_cpu "after the load" | tee -a "$OUT/idle.txt"
echo "== scenario 1 ratios (median of $REPS repetitions)"
median() { tr ' ,' '\n\n' | { grep . || true; } | sort -n | awk '{ a[NR] = $1 } END { print (NR ? a[int((NR + 1) / 2)] : "-") }'; }
for c in ${CONC//,/ }; do
	t=$(cat "$OUT"/overhead-*.txt | awk -v c="$c:" '/^ratio / && $5 == c { print $8 }' | median)
	p=$(cat "$OUT"/overhead-*.txt | awk -v c="$c:" '/^ratio / && $5 == c { print $NF }' | median)
	u=$(cat "$OUT"/overhead-*.txt | awk -v c="$c:" '/^server cpu per token / && $8 == c { print $NF }' | median)
	tt="target <= 1.3"; [ "$c" = 1 ] || tt="no target"
	pt=1.2; [ "$c" = 1 ] && pt=0.9
	echo "concurrency $c: ttft p50 ratio $t ($tt), tokens/s ratio $p (target >= $pt), server cpu per token ratio $u (target <= 1.5)"
done
cat "$OUT/idle.txt"
