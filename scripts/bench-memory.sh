#!/usr/bin/env bash
# Scenario 3 of `make bench`: the gateway's memory. A gateway whose
# workers serve the synthetic model at a token per 100 ms (so streams stay
# open while memory is read) runs on loopback; `h3infer bench --mem-pid`
# reads its resident set (VmRSS) before and while holding CONNS idle
# HTTP/3 connections (10,000 and 100,000 by default), each with a
# completed handshake and one answered GET /v1/models, all over one client
# UDP socket. A second, fresh gateway holds 1,000 connections and then one
# running stream on each. Each repetition starts fresh gateways, so every
# figure is against a baseline read in the same run; docs/BENCHMARKS.md
# quotes the medians.
#
# BASE names a second gateway binary (say, one built from main) measured
# the same way in every repetition, alternating with BIN, so that the two
# columns printed at the end share the machine's load.
#
# A held connection costs memory on both sides (the gateway about 100 KB
# before issue #22's work, the load generator as much again), so a level
# that would not fit in MemAvailable (PER_CONN bytes a connection, both
# sides, half of what is available) is replaced by the largest multiple
# of 10,000 that does, and the script says so.
set -euo pipefail
BIN=${BIN:-bin/h3infer}
BASE=${BASE:-}
REPS=${REPS:-3}
OUT=${OUT:-bench-out}
CONNS=${CONNS:-10000,100000}
STREAMS=${STREAMS:-1000}
PER_CONN=${PER_CONN:-262144}
command -v jq >/dev/null || { echo "bench-memory: needs jq" >&2; exit 1; }
mkdir -p "$OUT"

avail=$(($(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) * 1024))
fit=$((avail / 2 / PER_CONN / 10000 * 10000))
levels=()
for n in ${CONNS//,/ }; do
	if [ "$n" -gt "$fit" ]; then
		echo "bench-memory: $n connections need about $((n * PER_CONN >> 30)) GiB on both sides; half of MemAvailable ($((avail >> 30)) GiB) holds $fit" >&2
		n=$fit
	fi
	if [ "$n" -gt 0 ] && { [ ${#levels[@]} -eq 0 ] || [ "$n" -gt "${levels[-1]}" ]; }; then levels+=("$n"); fi
done
[ ${#levels[@]} -gt 0 ] || { echo "bench-memory: no level fits in memory" >&2; exit 1; }
CONNS=$(IFS=,; echo "${levels[*]}")
# Handshakes run at 100 to 200 a second on the shared 2-core machine: the
# bound on opening a level grows with it.
step_timeout=$((${levels[-1]} / 50 + 120))s
# The gateway and the load generator each use one UDP socket, and Go
# raises the soft descriptor limit to the hard one at start; raised here
# anyway for the workers.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
state=$(mktemp -d)
pid=
stop() {
	if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
	pid=
}
trap 'stop; rm -rf "$state"' EXIT
"$BIN" certs init --state-dir "$state" >/dev/null
# Every connection comes from 127.0.0.1, and the run holds more than the
# default bounds allow (gateway.max_connections_per_source 64,
# gateway.max_connections sized from memory, gateway.max_idle_connections
# three quarters of it): the config lifts them.
cat >"$state/memory.json" <<JSON
{"listen": "127.0.0.1:28643", "admin": "127.0.0.1:29290", "state_dir": "$state",
 "workers": {"count": 2, "slots": 512}, "scheduler": {"max_queue": 2048},
 "gateway": {"deadline": "2m", "max_connections": 250000, "max_connections_per_source": 250000,
             "max_idle_connections": 250000},
 "models": [{"name": "demo", "dir": "synthetic:100ms"}]}
JSON
# A baseline binary from before max_idle_connections existed rejects the
# key; it gets the file without it.
jq 'del(.gateway.max_idle_connections)' "$state/memory.json" >"$state/memory-base.json"
start() { # binary config
	"$1" serve --config "$2" >"$OUT/memory-serve.log" 2>&1 & pid=$!
	for _ in $(seq 150); do grep -q "is ready" "$OUT/memory-serve.log" && return; sleep 0.2; done
	echo "gateway did not start" >&2; cat "$OUT/memory-serve.log" >&2; exit 1
}
common=(--url https://127.0.0.1:28643 --ca "$state/certs/ca.pem" --state-dir "$state" --mem-parallel 16 --mem-stream-tokens 600)
run() { # label binary config repetition
	echo "== scenario 3, $1, repetition $4: idle connections ($CONNS)"
	start "$2" "$3"
	timeout 3600 "$BIN" bench "${common[@]}" --mem-pid "$pid" --mem-conns "$CONNS" --mem-streams 0 \
		--mem-step-timeout "$step_timeout" --json "$OUT/memory-$1-conns-$4.json" | tee "$OUT/memory-$1-conns-$4.txt"
	stop
	echo "== scenario 3, $1, repetition $4: active streams"
	start "$2" "$3"
	timeout 300 "$BIN" bench "${common[@]}" --mem-pid "$pid" --mem-conns 1000 --mem-streams "$STREAMS" \
		--json "$OUT/memory-$1-streams-$4.json" | tee "$OUT/memory-$1-streams-$4.txt"
	stop
}
labels=(gateway)
[ -z "$BASE" ] || labels+=(baseline)
rm -f "$OUT"/memory-{gateway,baseline}-*.json
for i in $(seq "$REPS"); do
	# Alternate which goes first, so that neither always meets the
	# machine's load first.
	order=("${labels[@]}")
	if [ $((i % 2)) -eq 0 ] && [ ${#labels[@]} -eq 2 ]; then order=(baseline gateway); fi
	for l in "${order[@]}"; do
		if [ "$l" = gateway ]; then run gateway "$BIN" "$state/memory.json" "$i"; else run baseline "$BASE" "$state/memory-base.json" "$i"; fi
	done
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# per LABEL KIND K: the median bytes per unit of step K over the
# repetitions (a level may hold a few connections less than asked: up to
# one in a hundred may fail to open on a loaded machine).
per() {
	for f in "$OUT"/memory-"$1"-"$2"-*.json; do
		if [ "$2" = conns ]; then
			jq -r --argjson k "$3" '.steps[$k].bytes_per_unit' "$f"
		else
			jq -r '.steps[] | select(.streams > 0) | .bytes_per_unit' "$f"
		fi
	done | median
}
kib() { awk -v b="$1" 'BEGIN {printf "%.1f KiB", b / 1024}'; }
row() { # name kind n
	g=$(per gateway "$2" "$3")
	if [ -z "$BASE" ]; then
		printf '%s: %s (%.0f bytes)\n' "$1" "$(kib "$g")" "$g"
	else
		b=$(per baseline "$2" "$3")
		printf '%s: %s (%.0f bytes); baseline %s (%.0f bytes); ratio %s\n' "$1" "$(kib "$g")" "$g" "$(kib "$b")" "$b" \
			"$(awk -v g="$g" -v b="$b" 'BEGIN {printf "%.2f", g / b}')"
	fi
}
echo "== scenario 3 (median of $REPS repetitions; per unit over the same run's baseline)"
k=0
for n in ${CONNS//,/ }; do
	row "$n idle connections, per connection" conns "$k"
	k=$((k + 1))
done
row "$STREAMS running streams, per stream over the same connections idle" streams 0
