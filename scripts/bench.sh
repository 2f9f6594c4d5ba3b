#!/usr/bin/env bash
# Scenario 1 of `make bench`: the gateway's overhead. A gateway whose
# workers serve the synthetic model (no model cost) and the bare quic-go
# comparison server run side by side on loopback; one `h3infer bench` run
# loads both at each concurrency level and prints the ratios. Repeated
# REPS times; docs/BENCHMARKS.md quotes the medians. CONC and REQUESTS
# change the levels and the requests per level (scripts/bench-ab.sh runs
# this script with one level).
set -euo pipefail
BIN=${BIN:-bin/h3infer}
REPS=${REPS:-3}
OUT=${OUT:-bench-out}
CONC=${CONC:-1,64,256}
REQUESTS=${REQUESTS:-1024}
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
"$BIN" bench --bare-listen 127.0.0.1:28444 --state-dir "$state" >"$OUT/bare.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do
	grep -q "is ready" "$OUT/serve.log" && grep -q listening "$OUT/bare.log" && break
	sleep 0.2
done
for i in $(seq "$REPS"); do
	echo "== scenario 1, repetition $i"
	"$BIN" bench --url https://127.0.0.1:28443 --baseline-url https://127.0.0.1:28444 \
		--ca "$state/certs/ca.pem" --state-dir "$state" --concurrency "$CONC" --requests "$REQUESTS" --duration 15s \
		--prompt-words 32 --output-tokens 64 --json "$OUT/overhead-$i.json" --plot "$OUT/overhead-$i" \
		| tee "$OUT/overhead-$i.txt"
done
echo "== scenario 1 ratios (median of $REPS repetitions)"
grep -h '^ratio' "$OUT"/overhead-*.txt | sort -t' ' -k5,5n | awk '
	{ c=$5; sub(":","",c); ttft[c]=ttft[c] " " $8; tps[c]=tps[c] " " $NF }
	END { for (c in ttft) print c, ttft[c], "|", tps[c] }' |
while read -r c rest; do
	t=$(echo "${rest%%|*}" | tr -d ',' | tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
	p=$(echo "${rest##*|}" | tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
	echo "concurrency $c: ttft p50 ratio $t (target <= 1.5), tokens/s ratio $p (target >= 0.7)"
done | sort -n -k2
