#!/usr/bin/env bash
# The edge hop: what an edge gateway in front of a regional tier adds to
# talking to the tier directly. The regional tier is an `h3infer serve`
# whose workers serve, as "big", either the synthetic model (MODEL=
# synthetic, the default: no model cost, so the tier's gateway and the
# edge's are all the work there is, the worst case for the hop) or the
# demo ONNX model run by ONNX Runtime (MODEL=onnx, at the tier's default
# slots: the model's cost, as with a real tier). The edge is an
# `h3infer serve` with its defaults and one upstream, the tier, over PROTO
# (h2 or h3). Both run the count-bounded queue (scheduler.admission
# "count"): concurrency 256 queues requests at both, and the closed loop
# would meet the default delay admission's refusals, which scenario 4
# measures, rather than the hop. One
# `h3infer bench` run loads the edge and, as its baseline, the tier
# itself at each concurrency level, and prints the ratios and the TTFT
# difference. Repeated REPS times; docs/BENCHMARKS.md quotes the medians.
set -euo pipefail
BIN=${BIN:-bin/h3infer}
REPS=${REPS:-3}
OUT=${OUT:-bench-out/upstream}
CONC=${CONC:-1,64,256}
REQUESTS=${REQUESTS:-1024}
PROTO=${PROTO:-h2}
MODEL=${MODEL:-synthetic}
mkdir -p "$OUT"
regional=$(mktemp -d)
edge=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$regional" "$edge"
}
trap cleanup EXIT
case $MODEL in
synthetic) workers='{"count": 2, "slots": 256}' dir=synthetic ;;
onnx)
	workers='{"count": 2}' dir="$regional/big"
	"$BIN" genmodel --out "$dir" >/dev/null
	;;
*) echo "MODEL: want synthetic or onnx, got $MODEL" >&2; exit 2 ;;
esac
cat >"$regional/config.json" <<JSON
{"listen": "127.0.0.1:28543", "admin": "127.0.0.1:29190", "state_dir": "$regional",
 "workers": $workers, "scheduler": {"max_queue": 1024, "admission": "count"},
 "models": [{"name": "big", "dir": "$dir"}]}
JSON
"$BIN" serve --config "$regional/config.json" >"$OUT/regional.log" 2>&1 & pids+=($!)
regional_pid=$!
for _ in $(seq 150); do
	grep -q "is ready" "$OUT/regional.log" && break
	sleep 0.2
done
# The edge's credential for the tier: the bearer part of the tier's dev
# token, in a file only its owner reads.
(umask 077; cut -d. -f1-4 "$regional/tokens/dev.token" >"$edge/regional.bearer")
cat >"$edge/config.json" <<JSON
{"listen": "127.0.0.1:28443", "admin": "127.0.0.1:29090", "state_dir": "$edge",
 "scheduler": {"admission": "count"},
 "upstreams": [{"name": "regional", "url": "https://127.0.0.1:28543", "protocol": "$PROTO",
   "ca_file": "$regional/certs/ca.pem", "credential_file": "$edge/regional.bearer"}]}
JSON
"$BIN" serve --config "$edge/config.json" >"$OUT/edge.log" 2>&1 & pids+=($!)
edge_pid=$!
# cpu PID: the process's user+system CPU time so far, in clock ticks.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# tokens LABEL FILE: the tokens a bench table counted for LABEL's runs.
tokens() { grep -A6 "^$1 (" "$2" | sed -nE 's/^throughput: .*\(([0-9]+) tokens\)/\1/p' | awk '{n += $1} END {print n}'; }
tck=$(getconf CLK_TCK)
for _ in $(seq 150); do
	grep -q "is ready" "$OUT/edge.log" && curl -sf http://127.0.0.1:29090/debug/state | grep -q '"big"' && break
	sleep 0.2
done
for i in $(seq "$REPS"); do
	echo "== edge hop ($PROTO towards the tier, $MODEL model), repetition $i"
	e0=$(cpu "$edge_pid") r0=$(cpu "$regional_pid")
	"$BIN" bench --url https://127.0.0.1:28443 --label edge --ca "$edge/certs/ca.pem" --state-dir "$edge" \
		--baseline-url https://127.0.0.1:28543 --baseline-label regional --baseline-state-dir "$regional" \
		--model big --concurrency "$CONC" --requests "$REQUESTS" --duration 15s \
		--prompt-words 32 --output-tokens 64 --json "$OUT/hop-$i.json" \
		| tee "$OUT/hop-$i.txt"
	# The hop's cost apart from the machine it shares: CPU time of the
	# edge's process per token it forwarded, beside the regional gateway
	# process's per token it served (its workers are other processes).
	e1=$(cpu "$edge_pid") r1=$(cpu "$regional_pid")
	et=$(tokens edge "$OUT/hop-$i.txt") rt=$(tokens regional "$OUT/hop-$i.txt")
	awk -v e=$((e1 - e0)) -v r=$((r1 - r0)) -v et="$et" -v rt="$rt" -v tck="$tck" 'BEGIN {
		printf "cpu per token: edge %.1f us, regional gateway %.1f us (edge/regional %.2f)\n",
			e / tck / et * 1e6, r / tck / (et + rt) * 1e6, (e / et) / (r / (et + rt)) }' | tee -a "$OUT/hop-$i.txt"
done
echo "== edge hop ($PROTO, $MODEL model), medians of $REPS repetitions"
for c in ${CONC//,/ }; do
	d=$(grep -h "^difference edge-regional at concurrency $c:" "$OUT"/hop-*.txt | sed -E 's/.*ttft p50 ([-+0-9.]+) ms.*/\1/' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
	t=$(grep -h "^ratio edge/regional at concurrency $c:" "$OUT"/hop-*.txt | sed -E 's/.*tokens\/s ([0-9.]+).*/\1/' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
	echo "concurrency $c: added ttft p50 $d ms (target <= 0.3 at c=1), tokens/s ratio $t (target >= 0.9 at c=64)"
done
grep -h '^cpu per token' "$OUT"/hop-*.txt
