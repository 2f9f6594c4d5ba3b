// Package netemu is a userspace link emulator for benchmarks on kernels
// without the netem qdisc. It moves IP packets between two TUN devices,
// usually one in each of two network namespaces, holding every packet for a
// one-way delay (with optional jitter), optionally behind a bandwidth
// limit, and dropping packets with seeded draws, alone or in bursts,
// separately per direction. Because it works on whole IP packets it treats
// QUIC and TCP alike: retransmission and head-of-line blocking happen in
// the endpoints' own stacks.
//
// The model (docs/BENCHMARKS.md gives it as the benchmark uses it): each
// direction is a queue of at most Limit packets ordered by release time. A
// packet arriving at t is lost with probability Loss: independently of
// other packets (Bernoulli) by default, or, with Burst > 1, by a two-state
// Gilbert chain that loses every packet while bad and none while good, so
// that losses come in runs of Burst packets on average at the same long-run
// rate. A packet not lost is released at t + Delay + U(-Jitter, +Jitter),
// never before t. With a Rate, the delay counts from the end of the
// packet's serialization instead of from t: packets cross the link one at a
// time in arrival order, each starting at t or when the link frees,
// whichever is later, and taking len*8/Rate; at most RateQueue may wait for
// the link, and lost packets take no time on it. Without jitter release
// times rise with arrival, so packets never reorder; with jitter they may,
// as on a real path. A packet arriving at a full queue or rate queue is
// dropped (tail drop) and counted apart from random loss. There is no
// duplication, corruption, or rate that varies over time.
//
// It imports nothing of h3infer; only cmd/h3infer and tests use it.
package netemu
