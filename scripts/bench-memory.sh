#!/usr/bin/env bash
# Scenario 3 of `make bench`: the gateway's memory. A gateway whose
# workers serve the synthetic model at a token per 100 ms (so streams stay
# open while memory is read) runs on loopback; `h3infer bench --mem-pid`
# reads its resident set (VmRSS) before and while holding 1,000 and then
# 10,000 idle HTTP/3 connections, each with a completed handshake and one
# answered GET /v1/models, all over one client UDP socket. A second, fresh
# gateway holds 1,000 connections and then one running stream on each.
# Each repetition starts fresh gateways, so every figure is against a
# baseline read in the same run; docs/BENCHMARKS.md quotes the medians.
set -euo pipefail
BIN=${BIN:-bin/h3infer}
REPS=${REPS:-3}
OUT=${OUT:-bench-out}
CONNS=${CONNS:-1000,10000}
STREAMS=${STREAMS:-1000}
mkdir -p "$OUT"
# One UDP socket per side, so descriptors are no limit; raised anyway in
# case the Go runtime or a worker wants more.
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
# gateway.max_connections sized from memory): the config lifts both.
cat >"$state/memory.json" <<JSON
{"listen": "127.0.0.1:28643", "admin": "127.0.0.1:29290", "state_dir": "$state",
 "workers": {"count": 2, "slots": 512}, "scheduler": {"max_queue": 2048},
 "gateway": {"deadline": "2m", "max_connections": 250000, "max_connections_per_source": 250000},
 "models": [{"name": "demo", "dir": "synthetic:100ms"}]}
JSON
start() {
	"$BIN" serve --config "$state/memory.json" >"$OUT/memory-serve.log" 2>&1 & pid=$!
	for _ in $(seq 150); do grep -q "is ready" "$OUT/memory-serve.log" && return; sleep 0.2; done
	echo "gateway did not start" >&2; cat "$OUT/memory-serve.log" >&2; exit 1
}
common=(--url https://127.0.0.1:28643 --ca "$state/certs/ca.pem" --state-dir "$state" --mem-parallel 16 --mem-stream-tokens 600)
for i in $(seq "$REPS"); do
	echo "== scenario 3, repetition $i: idle connections"
	start
	timeout 600 "$BIN" bench "${common[@]}" --mem-pid "$pid" --mem-conns "$CONNS" --mem-streams 0 \
		--json "$OUT/memory-conns-$i.json" | tee "$OUT/memory-conns-$i.txt"
	stop
	echo "== scenario 3, repetition $i: active streams"
	start
	timeout 300 "$BIN" bench "${common[@]}" --mem-pid "$pid" --mem-conns "${CONNS%%,*}" --mem-streams "$STREAMS" \
		--json "$OUT/memory-streams-$i.json" | tee "$OUT/memory-streams-$i.txt"
	stop
done
echo "== scenario 3 (median of $REPS repetitions)"
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for n in ${CONNS//,/ }; do
	b=$(grep -h "^  $n idle h3 connections" "$OUT"/memory-conns-*.txt | awk '{print $(NF-4)}' | median)
	echo "$n idle connections: $b bytes per connection over the baseline"
done
s=$(grep -h "active streams" "$OUT"/memory-streams-*.txt | awk '{print $(NF-4)}' | median)
echo "$STREAMS active streams: $s bytes per stream over the same connections idle"
