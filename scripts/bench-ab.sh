#!/usr/bin/env bash
# A/B of gateway builds on scenario 1 of `make bench`: scripts/bench-ab.sh
# BIN_A BIN_B ... Each build is measured the way scripts/bench.sh measures
# one: it serves (synthetic workers), answers as the bare comparison server
# and generates the load itself. Running every process from one binary
# matters here: a gateway built from the same binary as the load generator
# shares that executable's pages with it, which on a 2-vCPU VM was worth
# 60-100 us of time to first token at concurrency 1 (docs/BENCHMARKS.md,
# "Concurrency 1, second pass"). Builds take turns within each of ROUNDS
# rounds, so drift in the machine's load falls on all of them alike.
# Prints each run's ratio line and, at the end, each build's medians.
set -euo pipefail
ROUNDS=${ROUNDS:-3}
CONC=${CONC:-1}
REQ=${REQ:-4000}
if [ $# -lt 1 ]; then
	echo "usage: $0 BIN [BIN...]" >&2
	exit 2
fi
state=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$state"
}
trap cleanup EXIT
"$1" certs init --state-dir "$state" >/dev/null
cat >"$state/synthetic.json" <<JSON
{"listen": "127.0.0.1:28453", "admin": "127.0.0.1:29093", "state_dir": "$state",
 "workers": {"count": 2, "slots": 256}, "scheduler": {"max_queue": 1024},
 "models": [{"name": "demo", "dir": "synthetic"}]}
JSON
for r in $(seq "$ROUNDS"); do
	j=0
	for b in "$@"; do
		"$b" bench --bare-listen 127.0.0.1:28454 --state-dir "$state" >"$state/bare.log" 2>&1 &
		bare=$!
		pids+=("$bare")
		"$b" serve --config "$state/synthetic.json" >"$state/serve.log" 2>&1 &
		serve=$!
		pids+=("$serve")
		for _ in $(seq 100); do
			grep -q "is ready" "$state/serve.log" && grep -q listening "$state/bare.log" && break
			sleep 0.2
		done
		out=$("$b" bench --url https://127.0.0.1:28453 --baseline-url https://127.0.0.1:28454 \
			--ca "$state/certs/ca.pem" --state-dir "$state" --concurrency "$CONC" --requests "$REQ" \
			--duration 15s --prompt-words 32 --output-tokens 64)
		kill "$serve" "$bare"
		wait "$serve" "$bare" 2>/dev/null || true
		ttft=$(echo "$out" | awk '/^ *ttft/ {printf "%s ", $2}')
		echo "$out" | grep '^ratio' | sed "s|^|round $r build $j ($b): |; s|\$| (ttft p50 h3infer, bare: $ttft)|"
		j=$((j + 1))
	done
done | tee "$state/runs.txt"
echo "== medians over $ROUNDS rounds"
sed -E 's/^round [0-9]+ build ([0-9]+) \(([^)]*)\): .*ttft p50 ([0-9.]+), ttft p99.*/\1 \2 \3/' "$state/runs.txt" |
	sort -k1,1n -k3,3n | awk '{ v[$1] = v[$1] " " $3; name[$1] = $2 }
	END { for (b in v) print b, name[b], v[b] }' |
while read -r b name vals; do
	m=$(echo "$vals" | tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')
	echo "build $b ($name): ttft p50 ratio median $m (each: $vals)"
done | sort
