#!/usr/bin/env bash
# A/B of gateway builds on scenario 1 of `make bench`: scripts/bench-ab.sh
# BIN_A BIN_B ... Each build runs scripts/bench.sh as it is (one
# repetition, CONC levels, REQUESTS per level), so every process of a
# measurement (gateway and workers, bare server, load generator) comes from
# that build's own binary. That matters here: a gateway built from the same
# binary as the load generator shares that executable's pages with it,
# which on a 2-vCPU VM was worth 60-100 us of time to first token at
# concurrency 1 (docs/BENCHMARKS.md, "Concurrency 1, second pass"). Builds
# take turns within each of ROUNDS rounds, so drift in the machine's load
# falls on all of them alike. Prints each run's ratios and, at the end,
# each build's median time-to-first-token ratio per level.
set -euo pipefail
ROUNDS=${ROUNDS:-3}
export CONC=${CONC:-1}
export REQUESTS=${REQUESTS:-4000}
if [ $# -lt 1 ]; then
	echo "usage: $0 BIN [BIN...]" >&2
	exit 2
fi
here=$(dirname "$0")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for r in $(seq "$ROUNDS"); do
	j=0
	for b in "$@"; do
		BIN=$b REPS=1 OUT="$out/$r-$j" "$here/bench.sh" >"$out/$r-$j.log"
		grep '^ratio\|^server cpu' "$out/$r-$j/overhead-1.txt" | sed "s|^|round $r build $j ($b): |"
		grep '^idle cpu' "$out/$r-$j/idle.txt" | sed "s|^|round $r build $j ($b): |"
		j=$((j + 1))
	done
done | tee "$out/runs.txt"
echo "== medians over $ROUNDS rounds"
grep ': ratio ' "$out/runs.txt" | sed -E 's/^round [0-9]+ build ([0-9]+) \(([^)]*)\): .* at concurrency ([0-9]+): ttft p50 ([0-9.]+),.*/\1 \2 \3 \4/' |
	awk '{ k = $1 " (" $2 ") at concurrency " $3; v[k] = v[k] " " $4 }
	END { for (k in v) print k "|" v[k] }' |
while IFS='|' read -r k vals; do
	m=$(echo "$vals" | tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')
	echo "build $k: ttft p50 ratio median $m (each:$vals)"
done | sort
