#!/usr/bin/env bash
# Scenario 3 of `make bench`, weights: what the worker processes of one
# model cost in memory. A random model with about 400 MB of weights in
# model.onnx.data (`h3infer genmodel --random --external-data`) is served by
# N = 1, 2 and 4 workers; once every worker has answered a request (so its
# weights have been touched), the proportional set size of each
# (Pss in /proc/PID/smaps_rollup: a page shared by k processes counts 1/k
# in each) is summed. Each N runs three times in one go: with the weights
# copied into each worker (H3INFER_ORT_COPY_WEIGHTS=1, ONNX Runtime's own
# default), mapped from the model's file without prepacking
# (workers.weights_cache_disabled), and prepacked and mapped from the
# prepacked weights cache (the default; the cache starts empty at each N,
# so one of the N workers, which start together, builds its entry while
# the others wait for it), and the growth per
# extra worker is printed as a fraction of the weights. Then
# BenchmarkWeights in ./ort/ times reading the files, building the cache's
# entry, loading the model, a prefill and decode steps of 1 and 8
# sequences, the three side by side.
# docs/BENCHMARKS.md quotes a run.
set -euo pipefail
BIN=${BIN:-bin/h3infer}
OUT=${OUT:-bench-out}
MODEL=${MODEL:-$OUT/weights-model}
WORKERS=${WORKERS:-1 2 4}
GO=${GO:-go}
mkdir -p "$OUT"
if [ ! -f "$MODEL/model.onnx.data" ]; then
	# 2 layers of width 2048 (MLP 8192) and the byte vocabulary: 408 MB of
	# float32 weights, a decode step of tens of milliseconds here.
	"$BIN" genmodel --random --layers 2 --hidden 2048 --heads 16 --context 512 --external-data --out "$MODEL" >/dev/null
fi
weights=$(($(stat -c %s "$MODEL/model.onnx.data") + $(stat -c %s "$MODEL/model.onnx")))
CACHE=$OUT/weights-cache
state=$(mktemp -d)
pid=
stop() {
	if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
	pid=
}
trap 'stop; rm -rf "$state"' EXIT
"$BIN" certs init --state-dir "$state" >/dev/null
# pss_kb PID: the process's proportional set size in KiB.
pss_kb() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup"; }
rss_kb() { awk '/^Rss:/ {print $2}' "/proc/$1/smaps_rollup"; }
# measure MODE N: serve the model with N workers of one slot each, send
# requests until every worker holds the weights in its page tables, and
# print "MODE N total_pss_kib".
measure() {
	local mode=$1 n=$2 env=() cache
	cache=$(printf '"weights_cache_dir": "%s"' "$(realpath -m "$CACHE")")
	case $mode in
	copied) env=(H3INFER_ORT_COPY_WEIGHTS=1) ;;
	mapped) cache='"weights_cache_disabled": true' ;;
	esac
	cat >"$state/weights.json" <<JSON
{"listen": "127.0.0.1:28743", "admin": "127.0.0.1:29390", "state_dir": "$state",
 "workers": {"count": $n, "slots": 1, $cache},
 "models": [{"name": "weights", "dir": "$(realpath "$MODEL")"}]}
JSON
	env "${env[@]}" "$BIN" serve --config "$state/weights.json" >"$OUT/weights-serve.log" 2>&1 & pid=$!
	local start=$SECONDS
	for _ in $(seq 600); do grep -q "is ready" "$OUT/weights-serve.log" && break; sleep 0.2; done
	grep -q "is ready" "$OUT/weights-serve.log" || { echo "gateway did not start" >&2; cat "$OUT/weights-serve.log" >&2; exit 1; }
	# Where each worker's weights went, and the cache's builds.
	echo "  $mode $n: ready in $((SECONDS - start)) s; workers' weights:" \
		"$(grep -o 'weights=[a-z]*' "$OUT/weights-serve.log" | sort | uniq -c | tr -s ' \n' ' ')" \
		"$(grep -o 'cache: built.*build_ms=[0-9]*' "$OUT/weights-serve.log" | grep -o 'build_ms=[0-9]*' | tr '\n' ' ')" >&2
	if grep -q "cache not used" "$OUT/weights-serve.log"; then grep "cache not used" "$OUT/weights-serve.log" >&2; fi
	local workers
	workers=$(pgrep -P "$pid" | tr '\n' ' ')
	# A worker that has answered has touched every weight; with one slot
	# each, n requests at once land on n workers, but try again until the
	# resident set of every one of them holds the weights.
	for try in $(seq 10); do
		local chats=()
		for _ in $(seq "$n"); do
			"$BIN" chat --url https://127.0.0.1:28743 --state-dir "$state" --model weights --max-tokens 8 "memory" >>"$OUT/weights-chat.log" 2>&1 &
			chats+=($!)
		done
		wait "${chats[@]}" || true
		local cold=0
		for w in $workers; do [ $(($(rss_kb "$w") * 1024)) -lt $((weights * 9 / 10)) ] && cold=1; done
		[ "$cold" = 0 ] && break
		[ "$try" = 10 ] && { echo "a worker never touched its weights" >&2; exit 1; }
	done
	sleep 1
	local total=0
	for w in $workers; do total=$((total + $(pss_kb "$w"))); done
	echo "$mode $n $total"
	stop
}
echo "== scenario 3, weights: $MODEL, $weights bytes of model files"
rows=()
for mode in copied mapped prepacked; do
	for n in $WORKERS; do
		rm -rf "$CACHE"
		rows+=("$(measure "$mode" "$n")")
	done
done
printf '%-9s %8s %16s %30s\n' weights workers "worker PSS" "growth per extra worker"
for row in "${rows[@]}"; do
	read -r mode n kb <<<"$row"
	first=$(printf '%s\n' "${rows[@]}" | awk -v m="$mode" '$1 == m {print $2, $3; exit}')
	read -r n1 kb1 <<<"$first"
	if [ "$n" = "$n1" ]; then growth="—"; else
		growth=$(awk -v kb="$kb" -v kb1="$kb1" -v n="$n" -v n1="$n1" -v w="$weights" \
			'BEGIN {d = (kb - kb1) * 1024 / (n - n1); printf "%.1f MiB = %.3fx the weights", d / 1048576, d / w}')
	fi
	printf '%-9s %8s %12.1f MiB %30s\n' "$mode" "$n" "$(awk -v kb="$kb" 'BEGIN {print kb / 1024}')" "$growth"
done
echo "== scenario 3, weights: load and decode, copied, mapped and prepacked (BenchmarkWeights)"
# Loads and prefills are few and long, decode steps many and short; each
# build writes an entry of twice the weights.
export H3INFER_BENCH_WEIGHTS_MODEL
H3INFER_BENCH_WEIGHTS_MODEL=$(realpath "$MODEL")
{
	$GO test -run '^$' -bench 'Weights/(read|build|load)' -benchtime 5x ./ort/
	$GO test -run '^$' -bench 'Weights/prefill' -benchtime 20x ./ort/
	$GO test -run '^$' -bench 'Weights/decode' -benchtime 200x ./ort/
} | tee "$OUT/weights-bench.txt"
awk 'function rates(name) {
		for (i = 1; i < NF; i++) {if ($(i+1) == "copied-tokens/s") c = $i; if ($(i+1) == "mapped-tokens/s") m = $i; if ($(i+1) == "prepacked-tokens/s") p = $i}
		printf "%-38s copied %8.2f, mapped %8.2f (%.3fx), prepacked %8.2f (%.3fx)\n", name, c, m, m / c, p, p / c
	}
	/Weights\/prefill/ {rates("prefill of 64 tokens, tokens/s:")}
	/Weights\/decode\/batch=1-/ {rates("decode of 1 sequence, tokens/s:")}
	/Weights\/decode\/batch=8-/ {rates("decode of 8 sequences, tokens/s:")}
	/load\/weights=mapped/ {lm = $3} /load\/weights=copied/ {lc = $3} /load\/weights=prepacked/ {lp = $3} /Weights\/build/ {b = $3} /Weights\/read/ {r = $3}
	END {printf "load per worker: copied %.0f ms, mapped %.0f ms, prepacked from the cache %.0f ms, building the entry first %.0f ms; reading the files %.0f ms\n", lc / 1e6, lm / 1e6, lp / 1e6, b / 1e6, r / 1e6}' "$OUT/weights-bench.txt"
du -sh "$CACHE" | sed 's/^/cache on disk: /'
