#!/usr/bin/env bash
# Scenario 2 of `make bench`: network conditions. Two network namespaces
# with 25 ms of delay each way (50 ms RTT) and, per condition, a mobile
# link's impairments on top: random loss of 1%, 3% and 5%, bursty loss
# (3% in runs of 3 packets on average, a Gilbert two-state chain), jitter
# of ±10 ms each way (packets reorder) and a 10 Mbit/s bottleneck with a
# 64-packet queue. The gateway (synthetic model, a token every 10 ms per
# stream) runs in one namespace, h3infer bench in the other; no traffic
# leaves them.
#
# The link is the kernel's netem qdisc on a veth pair where the kernel has
# it; otherwise `h3infer netemu`, a userspace emulator that moves the IP
# packets between a TUN device in each namespace (internal/netemu). Force
# one with LINK=netem or LINK=tun. Needs root, iproute2 and jq. The
# namespaces, the gateway and the emulator are removed on exit, by PID.
#
# Per condition and repetition (REPS, default 3): time to first token
# over a new connection per request (REQS requests, default 40) for h3 in
# 0-RTT (resumed, the POST in early data), h3 in 1-RTT (full handshake)
# and h2 over TCP+TLS 1.3; then the inter-token latency of 16 concurrent
# streams sharing one connection, h3 against h2. The summary quotes
# medians over repetitions, ratios taken within each repetition, and the
# longest inter-token gap of any repetition, each beside its goal.
# CONDS picks conditions (default: all, in the order above); QLOG=1 writes
# a qlog trace of every QUIC connection of both ends into OUT/qlog-COND.
# With MERGE_AB=1 (the default) a second gateway, the same but for
# gateway.coalesce.merge "off" (one event per token whatever the link),
# serves the 16 streams too, right after the first, so the table shows
# what merging tokens on a congested connection changes in the same run.
set -euo pipefail
BIN=$(realpath "${BIN:-bin/h3infer}"); export BIN
OUT=$(realpath -m "${OUT:-bench-out}")
REPS=${REPS:-3}
REQS=${REQS:-40}
CONDS=${CONDS:-loss0 loss1 loss3 loss5 burst3 jitter10 rate10}
QLOG=${QLOG:-0}
MERGE_AB=${MERGE_AB:-1}
LINK=${LINK:-auto}
mkdir -p "$OUT"
command -v jq >/dev/null || { echo "bench-netem: needs jq" >&2; exit 1; }
SRV=h3i-bench-srv CLI=h3i-bench-cli
SRV_IP=10.77.0.1 CLI_IP=10.77.0.2
state=$(mktemp -d) state_off=$(mktemp -d)
spid="" spid_off="" epid=""
stop_pid() { # stop_pid PID: ends one process this script started
	[ -n "$1" ] || return 0
	kill "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}
cleanup() {
	stop_pid "$spid"
	stop_pid "$spid_off"
	stop_pid "$epid"
	ip netns del "$SRV" 2>/dev/null || true
	ip netns del "$CLI" 2>/dev/null || true
	rm -rf "$state" "$state_off"
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

# cond NAME: the condition's impairments, each way, on top of 25 ms of
# delay: loss (percent), burst (mean run of lost packets; 0: independent),
# jitter (ms, uniform ±), rate (Mbit/s; 0: none).
cond() {
	loss=0 burst=0 jitter=0 rate=0
	case "$1" in
	loss0) ;;
	loss1) loss=1 ;;
	loss3) loss=3 ;;
	loss5) loss=5 ;;
	burst3) loss=3 burst=3 ;;
	jitter10) jitter=10 ;;
	rate10) rate=10 ;;
	*) echo "bench-netem: unknown condition $1 (loss0 loss1 loss3 loss5 burst3 jitter10 rate10)" >&2; exit 1 ;;
	esac
}

# set_link NAME: 25 ms each way and the condition's impairments each way.
set_link() {
	cond "$1"
	if [ "$mode" = netem ]; then
		local args=(delay 25ms)
		[ "$jitter" = 0 ] || args+=("${jitter}ms")
		if [ "$burst" != 0 ]; then
			# netem's gemodel p r 1-h 1-k: enter the bad state with p, leave
			# it with r = 1/burst; every packet lost in it, none outside.
			args+=(loss gemodel "$(awk -v l="$loss" -v b="$burst" 'BEGIN {r = 1 / b; printf "%.4f%%", 100 * (l / 100) * r / (1 - l / 100)}')" "$(awk -v b="$burst" 'BEGIN {printf "%.4f%%", 100 / b}')" 100% 0%)
		elif [ "$loss" != 0 ]; then
			args+=(loss "$loss%")
		fi
		[ "$rate" = 0 ] || args+=(rate "${rate}mbit" limit 64)
		ip netns exec "$SRV" tc qdisc replace dev h3i-s root netem "${args[@]}"
		ip netns exec "$CLI" tc qdisc replace dev h3i-c root netem "${args[@]}"
		return
	fi
	stop_pid "$epid"; epid=""
	local rateflag=""
	[ "$rate" = 0 ] || rateflag="${rate}mbit"
	"$BIN" netemu --a-netns "/run/netns/$SRV" --a-dev h3i-s --b-netns "/run/netns/$CLI" --b-dev h3i-c \
		--delay 25ms --jitter "${jitter}ms" --loss "$loss%" --burst "$burst" --rate "$rateflag" --rate-queue 64 \
		--seed "$((17 + loss + 10 * burst + jitter + rate))" >"$OUT/netemu-$1.log" 2>&1 & epid=$!
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
qlog_serve=()
[ "$QLOG" = 1 ] && qlog_serve=(--qlog "$OUT/qlog-serve")
ip netns exec "$SRV" "$BIN" serve --config "$state/cfg.json" "${qlog_serve[@]}" >"$OUT/netem-serve.log" 2>&1 & spid=$!
for _ in $(seq 100); do grep -q "is ready" "$OUT/netem-serve.log" && break; kill -0 "$spid" 2>/dev/null || break; sleep 0.2; done
grep -q "is ready" "$OUT/netem-serve.log" || { echo "bench-netem: gateway did not start" >&2; cat "$OUT/netem-serve.log" >&2; exit 1; }
if [ "$MERGE_AB" = 1 ]; then
	"$BIN" certs init --state-dir "$state_off" --name "$SRV_IP" >/dev/null
	cat >"$state_off/cfg.json" <<JSON
{"listen": "$SRV_IP:8444", "admin": "127.0.0.1:9091", "state_dir": "$state_off",
 "workers": {"count": 2, "slots": 64}, "models": [{"name": "demo", "dir": "synthetic:10ms"}],
 "gateway": {"coalesce": {"merge": "off"}}}
JSON
	ip netns exec "$SRV" "$BIN" serve --config "$state_off/cfg.json" >"$OUT/netem-serve-off.log" 2>&1 & spid_off=$!
	for _ in $(seq 100); do grep -q "is ready" "$OUT/netem-serve-off.log" && break; kill -0 "$spid_off" 2>/dev/null || break; sleep 0.2; done
	grep -q "is ready" "$OUT/netem-serve-off.log" || { echo "bench-netem: gateway (merge off) did not start" >&2; cat "$OUT/netem-serve-off.log" >&2; exit 1; }
fi
# The in-memory strike register declines 0-RTT for two freshness windows
# (zero_rtt.window, 10s) after start-up.
sleep 21

bench() {
	local q=()
	[ "$QLOG" = 1 ] && q=(--qlog "$OUT/qlog-$c")
	ip netns exec "$CLI" "$BIN" bench --url "https://$SRV_IP:8443" --ca "$state/certs/ca.pem" --state-dir "$state" "${q[@]}" "$@"
}
for c in $CONDS; do
	set_link "$c"
	for rep in $(seq "$REPS"); do
		echo "== scenario 2: 50 ms RTT, $c, repetition $rep"
		p="$OUT/netem-$c-$rep"
		# Time to first token on a new connection per request.
		bench --label h3-0rtt --proto h3 --new-conn --0rtt --requests "$REQS" --output-tokens 4 --json "$p-h3-0rtt.json" | tee "$p-h3-0rtt.txt"
		bench --label h3-1rtt --proto h3 --new-conn --requests "$REQS" --output-tokens 4 --json "$p-h3-1rtt.json" | tee "$p-h3-1rtt.txt"
		bench --label h2 --proto h2 --new-conn --requests "$REQS" --output-tokens 4 --json "$p-h2.json" | tee "$p-h2.txt"
		# Inter-token latency of 16 streams sharing one connection.
		for proto in h3 h2; do
			bench --label "$proto-16streams" --proto "$proto" --concurrency 16 --requests 32 --output-tokens 100 --timeout 120s \
				--json "$p-$proto-16.json" --plot "$p-$proto-16" | tee "$p-$proto-16.txt"
			if [ "$proto" = h3 ] && [ "$MERGE_AB" = 1 ]; then
				ip netns exec "$CLI" "$BIN" bench --url "https://$SRV_IP:8444" --ca "$state_off/certs/ca.pem" --state-dir "$state_off" \
					--label "h3-16streams-merge-off" --proto h3 --concurrency 16 --requests 32 --output-tokens 100 --timeout 120s \
					--json "$p-h3off-16.json" --plot "$p-h3off-16" | tee "$p-h3off-16.txt"
			fi
		done
	done
	if [ "$mode" = tun ]; then stop_pid "$epid"; epid=""; grep '^netemu ' "$OUT/netemu-$c.log"; fi
done

# Summary: medians over repetitions (ms), ratios taken within each one,
# and the longest gap of any repetition.
ms() { jq -r ".runs[0].$2 / 1e6" "$1"; }
median() { sort -n | awk '{a[NR]=$1} END {printf "%.1f", (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
median2() { sort -n | awk '{a[NR]=$1} END {printf "%.2f", (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
maximum() { sort -n | tail -1 | awk '{printf "%.0f", $1}'; }
# ratio A B FIELD: the median over repetitions of A's FIELD over B's.
ratio() {
	for r in $(seq "$REPS"); do echo "$(ms "$OUT/netem-$c-$r-$1.json" "$3") $(ms "$OUT/netem-$c-$r-$2.json" "$3")" | awk '{print $1/$2}'; done | median2
}
{
echo "== scenario 2 summary ($mode link; 50 ms RTT; medians of $REPS repetitions, $REQS requests each; ms)"
printf '%-9s | %-26s | %-26s | %-14s | %-14s | %-6s | %-20s | %-13s | %-15s\n' condition \
	"ttft p50 0rtt/1rtt/h2" "ttft p90 0rtt/1rtt/h2" "0rtt/1rtt p50" "1rtt/h2 p90" early "itl p99 h3 / h2" "h3/h2 p99" "max gap h3 / h2"
printf '%-9s | %-26s | %-26s | %-14s | %-14s | %-6s | %-20s | %-13s | %-15s\n' goal "" "" "<= 0.55" "<= 0.75" "" "" "<= 0.7" "h3 <= h2"
for c in $CONDS; do
	cells=()
	for q in p50_ns p90_ns; do
		cell=""
		for m in h3-0rtt h3-1rtt h2; do
			v=$(for r in $(seq "$REPS"); do ms "$OUT/netem-$c-$r-$m.json" "ttft.$q"; done | median)
			cell="$cell${cell:+ / }$v"
		done
		cells+=("$cell")
	done
	early=$(for r in $(seq "$REPS"); do jq -r '"\(.runs[0].early) \(.runs[0].ok) \(.runs[0].requests)"' "$OUT/netem-$c-$r-h3-0rtt.json"; done | awk '{e+=$1; n+=$3} END {printf "%d/%d", e, n}')
	i3=$(for r in $(seq "$REPS"); do ms "$OUT/netem-$c-$r-h3-16.json" itl.p99_ns; done | median)
	i2=$(for r in $(seq "$REPS"); do ms "$OUT/netem-$c-$r-h2-16.json" itl.p99_ns; done | median)
	m3=$(for r in $(seq "$REPS"); do ms "$OUT/netem-$c-$r-h3-16.json" itl.max_ns; done | maximum)
	m2=$(for r in $(seq "$REPS"); do ms "$OUT/netem-$c-$r-h2-16.json" itl.max_ns; done | maximum)
	printf '%-9s | %-26s | %-26s | %-14s | %-14s | %-6s | %-20s | %-13s | %-15s\n' "$c" "${cells[0]}" "${cells[1]}" \
		"$(ratio h3-0rtt h3-1rtt ttft.p50_ns)" "$(ratio h3-1rtt h2 ttft.p90_ns)" "$early" "$i3 / $i2" "$(ratio h3-16 h2-16 itl.p99_ns)" "$m3 / $m2"
done
if [ "$MERGE_AB" = 1 ]; then
	echo
	echo "== the 16 streams over h3 with merging on (the default) and off (gateway.coalesce.merge), h2 beside; medians of $REPS repetitions, ratios within each; ms"
	printf '%-9s | %-26s | %-22s | %-22s | %-22s | %-22s\n' condition "itl p99 h3 / h3 off / h2" "h3/h2 / off/h2 p99" "max gap h3 / off / h2" "tok/s h3 / off / h2" "e2e p50 h3 / off / h2"
	for c in $CONDS; do
		med() { for r in $(seq "$REPS"); do ms "$OUT/netem-$c-$r-$1-16.json" "$2"; done | median; }
		tps() { for r in $(seq "$REPS"); do jq -r '.runs[0].tokens_per_s' "$OUT/netem-$c-$r-$1-16.json"; done | median; }
		printf '%-9s | %-26s | %-22s | %-22s | %-22s | %-22s\n' "$c" \
			"$(med h3 itl.p99_ns) / $(med h3off itl.p99_ns) / $(med h2 itl.p99_ns)" \
			"$(ratio h3-16 h2-16 itl.p99_ns) / $(ratio h3off-16 h2-16 itl.p99_ns)" \
			"$(for r in $(seq "$REPS"); do ms "$OUT/netem-$c-$r-h3-16.json" itl.max_ns; done | maximum) / $(for r in $(seq "$REPS"); do ms "$OUT/netem-$c-$r-h3off-16.json" itl.max_ns; done | maximum) / $(for r in $(seq "$REPS"); do ms "$OUT/netem-$c-$r-h2-16.json" itl.max_ns; done | maximum)" \
			"$(tps h3) / $(tps h3off) / $(tps h2)" \
			"$(med h3 e2e.p50_ns) / $(med h3off e2e.p50_ns) / $(med h2 e2e.p50_ns)"
	done
fi
} | tee "$OUT/netem-summary.txt"
