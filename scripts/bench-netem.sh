#!/usr/bin/env bash
# Scenario 2 of `make bench`: network conditions. Two network namespaces
# with 25 ms of delay each way (50 ms RTT), then 1% and 3% random loss on
# top. The gateway (synthetic model, a token every 10 ms per stream) runs
# in one namespace, h3infer bench in the other; no traffic leaves them.
#
# The link is the kernel's netem qdisc on a veth pair where the kernel has
# it; otherwise `h3infer netemu`, a userspace emulator that moves the IP
# packets between a TUN device in each namespace (internal/netemu). Force
# one with LINK=netem or LINK=tun. Needs root, iproute2 and jq. The
# namespaces, the gateway and the emulator are removed on exit, by PID.
#
# Per loss level and repetition (REPS, default 3): time to first token
# over a new connection per request (REQS requests, default 40) for h3 in
# 0-RTT (resumed, the POST in early data), h3 in 1-RTT (full handshake)
# and h2 over TCP+TLS 1.3; then the inter-token latency of 16 concurrent
# streams sharing one connection, h3 against h2. The summary quotes
# medians over repetitions and ratios within each repetition.
set -euo pipefail
BIN=$(realpath "${BIN:-bin/h3infer}"); export BIN
OUT=$(realpath -m "${OUT:-bench-out}")
REPS=${REPS:-3}
REQS=${REQS:-40}
LOSSES=${LOSSES:-0 1 3}
LINK=${LINK:-auto}
mkdir -p "$OUT"
command -v jq >/dev/null || { echo "bench-netem: needs jq" >&2; exit 1; }
SRV=h3i-bench-srv CLI=h3i-bench-cli
SRV_IP=10.77.0.1 CLI_IP=10.77.0.2
state=$(mktemp -d)
spid="" epid=""
stop_pid() { # stop_pid PID: ends one process this script started
	[ -n "$1" ] || return 0
	kill "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}
cleanup() {
	stop_pid "$spid"
	stop_pid "$epid"
	ip netns del "$SRV" 2>/dev/null || true
	ip netns del "$CLI" 2>/dev/null || true
	rm -rf "$state"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$SRV"
ip netns add "$CLI"
for ns in "$SRV" "$CLI"; do ip -n "$ns" link set lo up; done

# netem first, where the kernel has it.
mode=tun
if [ "$LINK" != tun ]; then
	ip link add h3i-s type veth peer name h3i-c
	ip link set h3i-s netns "$SRV"
	ip link set h3i-c netns "$CLI"
	if ip netns exec "$SRV" tc qdisc add dev h3i-s root netem delay 1ms 2>/dev/null; then
		mode=netem
	else
		[ "$LINK" = netem ] && { echo "bench-netem: LINK=netem, but this kernel has no netem qdisc (sch_netem)" >&2; exit 1; }
		ip -n "$SRV" link del h3i-s
	fi
fi
if [ "$mode" = tun ]; then
	ip -n "$SRV" tuntap add dev h3i-s mode tun
	ip -n "$CLI" tuntap add dev h3i-c mode tun
fi
ip -n "$SRV" addr add "$SRV_IP/30" dev h3i-s
ip -n "$CLI" addr add "$CLI_IP/30" dev h3i-c
ip -n "$SRV" link set h3i-s up
ip -n "$CLI" link set h3i-c up
echo "== scenario 2: link emulated by $([ "$mode" = netem ] && echo "the netem qdisc" || echo "h3infer netemu (userspace, TUN)")"

# set_link LOSS: 25 ms each way and LOSS percent random loss each way.
set_link() {
	if [ "$mode" = netem ]; then
		ip netns exec "$SRV" tc qdisc replace dev h3i-s root netem delay 25ms loss "$1%"
		ip netns exec "$CLI" tc qdisc replace dev h3i-c root netem delay 25ms loss "$1%"
		return
	fi
	stop_pid "$epid"; epid=""
	"$BIN" netemu --a-netns "/run/netns/$SRV" --a-dev h3i-s --b-netns "/run/netns/$CLI" --b-dev h3i-c \
		--delay 25ms --loss "$1%" --seed "$((17 + $1))" >"$OUT/netemu-$1.log" 2>&1 & epid=$!
	# The kernel passes a TUN device's packets only once it reports the
	# device UP, up to a second after the emulator attaches.
	for _ in $(seq 100); do
		ip -n "$SRV" -o link show dev h3i-s | grep -q "state UP" &&
			ip -n "$CLI" -o link show dev h3i-c | grep -q "state UP" && return
		kill -0 "$epid" 2>/dev/null || break
		sleep 0.1
	done
	echo "bench-netem: the emulated link did not come up:" >&2; cat "$OUT/netemu-$1.log" >&2; exit 1
}

"$BIN" certs init --state-dir "$state" --name "$SRV_IP" >/dev/null
cat >"$state/cfg.json" <<JSON
{"listen": "$SRV_IP:8443", "admin": "127.0.0.1:9090", "state_dir": "$state",
 "workers": {"count": 2, "slots": 64}, "models": [{"name": "demo", "dir": "synthetic:10ms"}]}
JSON
ip netns exec "$SRV" "$BIN" serve --config "$state/cfg.json" >"$OUT/netem-serve.log" 2>&1 & spid=$!
for _ in $(seq 100); do grep -q "is ready" "$OUT/netem-serve.log" && break; kill -0 "$spid" 2>/dev/null || break; sleep 0.2; done
grep -q "is ready" "$OUT/netem-serve.log" || { echo "bench-netem: gateway did not start" >&2; cat "$OUT/netem-serve.log" >&2; exit 1; }
# The in-memory strike register declines 0-RTT for two freshness windows
# (zero_rtt.window, 10s) after start-up.
sleep 21

bench() {
	ip netns exec "$CLI" "$BIN" bench --url "https://$SRV_IP:8443" --ca "$state/certs/ca.pem" --state-dir "$state" "$@"
}
for loss in $LOSSES; do
	set_link "$loss"
	for rep in $(seq "$REPS"); do
		echo "== scenario 2: 50 ms RTT, ${loss}% loss, repetition $rep"
		p="$OUT/netem-$loss-$rep"
		# Time to first token on a new connection per request.
		bench --label h3-0rtt --proto h3 --new-conn --0rtt --requests "$REQS" --output-tokens 4 --json "$p-h3-0rtt.json" | tee "$p-h3-0rtt.txt"
		bench --label h3-1rtt --proto h3 --new-conn --requests "$REQS" --output-tokens 4 --json "$p-h3-1rtt.json" | tee "$p-h3-1rtt.txt"
		bench --label h2 --proto h2 --new-conn --requests "$REQS" --output-tokens 4 --json "$p-h2.json" | tee "$p-h2.txt"
		# Inter-token latency of 16 streams sharing one connection.
		for proto in h3 h2; do
			bench --label "$proto-16streams" --proto "$proto" --concurrency 16 --requests 32 --output-tokens 100 --timeout 120s \
				--json "$p-$proto-16.json" --plot "$p-$proto-16" | tee "$p-$proto-16.txt"
		done
	done
	if [ "$mode" = tun ]; then stop_pid "$epid"; epid=""; cat "$OUT/netemu-$loss.log" | grep '^netemu '; fi
done

# Summary: medians over repetitions (ms), ratios taken within each one.
ms() { jq -r ".runs[0].$2 / 1e6" "$1"; }
median() { sort -n | awk '{a[NR]=$1} END {printf "%.1f", (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
median2() { sort -n | awk '{a[NR]=$1} END {printf "%.2f", (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
{
echo "== scenario 2 summary ($mode link; medians of $REPS repetitions, $REQS requests each)"
echo "loss | ttft p50 h3-0rtt / h3-1rtt / h2 | ttft p90 h3-0rtt / h3-1rtt / h2 | ratio 0rtt/1rtt p50 | ratio h2/1rtt p50 | early | itl p99 h3-16 / h2-16 | ratio h2/h3 itl p99"
for loss in $LOSSES; do
	row="$loss%"
	for q in p50_ns p90_ns; do
		cell=""
		for m in h3-0rtt h3-1rtt h2; do
			v=$(for r in $(seq "$REPS"); do ms "$OUT/netem-$loss-$r-$m.json" "ttft.$q"; done | median)
			cell="$cell${cell:+ / }$v"
		done
		row="$row | $cell"
	done
	r01=$(for r in $(seq "$REPS"); do echo "$(ms "$OUT/netem-$loss-$r-h3-0rtt.json" ttft.p50_ns) $(ms "$OUT/netem-$loss-$r-h3-1rtt.json" ttft.p50_ns)" | awk '{print $1/$2}'; done | median2)
	r21=$(for r in $(seq "$REPS"); do echo "$(ms "$OUT/netem-$loss-$r-h2.json" ttft.p50_ns) $(ms "$OUT/netem-$loss-$r-h3-1rtt.json" ttft.p50_ns)" | awk '{print $1/$2}'; done | median2)
	early=$(for r in $(seq "$REPS"); do jq -r '"\(.runs[0].early) \(.runs[0].ok) \(.runs[0].requests)"' "$OUT/netem-$loss-$r-h3-0rtt.json"; done | awk '{e+=$1; o+=$2; n+=$3} END {printf "%d/%d ok of %d", e, o, n}')
	i3=$(for r in $(seq "$REPS"); do ms "$OUT/netem-$loss-$r-h3-16.json" itl.p99_ns; done | median)
	i2=$(for r in $(seq "$REPS"); do ms "$OUT/netem-$loss-$r-h2-16.json" itl.p99_ns; done | median)
	ri=$(for r in $(seq "$REPS"); do echo "$(ms "$OUT/netem-$loss-$r-h2-16.json" itl.p99_ns) $(ms "$OUT/netem-$loss-$r-h3-16.json" itl.p99_ns)" | awk '{print $1/$2}'; done | median2)
	echo "$row | $r01 | $r21 | $early | $i3 / $i2 | $ri"
done
} | tee "$OUT/netem-summary.txt"
