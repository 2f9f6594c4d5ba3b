#!/usr/bin/env bash
# Scenario 2 of `make bench`: network conditions. Two network namespaces
# joined by a veth pair with netem on both ends (25 ms each way: 50 ms
# RTT), then 1% and 3% loss. The gateway (synthetic model, a token every
# 10 ms per stream) runs in one namespace, h3infer bench in the other; no
# traffic leaves them. Needs root. The namespaces are removed on exit.
set -euo pipefail
BIN=$(realpath "${BIN:-bin/h3infer}")
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
SRV=h3i-bench-srv CLI=h3i-bench-cli
state=$(mktemp -d)
spid=""
cleanup() {
	[ -n "$spid" ] && kill "$spid" 2>/dev/null && wait "$spid" 2>/dev/null || true
	ip netns del "$SRV" 2>/dev/null || true
	ip netns del "$CLI" 2>/dev/null || true
	rm -rf "$state"
}
trap cleanup EXIT
ip netns add "$SRV"
ip netns add "$CLI"
ip link add h3i-s type veth peer name h3i-c
ip link set h3i-s netns "$SRV"
ip link set h3i-c netns "$CLI"
ip -n "$SRV" addr add 10.77.0.1/24 dev h3i-s
ip -n "$CLI" addr add 10.77.0.2/24 dev h3i-c
for ns in "$SRV" "$CLI"; do ip -n "$ns" link set lo up; done
ip -n "$SRV" link set h3i-s up
ip -n "$CLI" link set h3i-c up

if ! ip netns exec "$SRV" tc qdisc add dev h3i-s root netem delay 1ms 2>/dev/null; then
	echo "== scenario 2 not run: this kernel has no netem qdisc (sch_netem)" >&2
	exit 0
fi
"$BIN" certs init --state-dir "$state" --name 10.77.0.1 >/dev/null
cat >"$state/cfg.json" <<JSON
{"listen": "10.77.0.1:8443", "admin": "10.77.0.1:9090", "state_dir": "$state",
 "workers": {"count": 2, "slots": 64}, "models": [{"name": "demo", "dir": "synthetic:10ms"}]}
JSON
ip netns exec "$SRV" "$BIN" serve --config "$state/cfg.json" >"$OUT/netem-serve.log" 2>&1 & spid=$!
for _ in $(seq 100); do grep -q "is ready" "$OUT/netem-serve.log" && break; sleep 0.2; done

bench() { ip netns exec "$CLI" "$BIN" bench --url https://10.77.0.1:8443 --ca "$state/certs/ca.pem" "$@"; }
for loss in 0 1 3; do
	for dev in "$SRV h3i-s" "$CLI h3i-c"; do
		set -- $dev
		ip netns exec "$1" tc qdisc replace dev "$2" root netem delay 25ms loss "${loss}%"
	done
	echo "== scenario 2: 50 ms RTT, ${loss}% loss"
	# Time to first token on a new connection per request.
	bench --label "h3-0rtt" --proto h3 --new-conn --0rtt --requests 20 --output-tokens 4 --json "$OUT/netem-$loss-h3-0rtt.json" | tee "$OUT/netem-$loss-h3-0rtt.txt"
	bench --label "h3-1rtt" --proto h3 --new-conn --requests 20 --output-tokens 4 --json "$OUT/netem-$loss-h3-1rtt.json" | tee "$OUT/netem-$loss-h3-1rtt.txt"
	bench --label "h2" --proto h2 --new-conn --requests 20 --output-tokens 4 --json "$OUT/netem-$loss-h2.json" | tee "$OUT/netem-$loss-h2.txt"
	# Inter-token latency of 16 streams on one connection.
	for p in h3 h2; do
		bench --label "$p-16streams" --proto "$p" --concurrency 16 --requests 32 --output-tokens 100 --timeout 120s \
			--json "$OUT/netem-$loss-$p-16.json" --plot "$OUT/netem-$loss-$p-16" | tee "$OUT/netem-$loss-$p-16.txt"
	done
done
