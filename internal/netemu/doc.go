// Package netemu is a userspace link emulator for benchmarks on kernels
// without the netem qdisc. It moves IP packets between two TUN devices,
// usually one in each of two network namespaces, holding every packet for
// a one-way delay (with optional jitter) and dropping packets at random
// with a seeded Bernoulli draw, separately per direction. Because it works
// on whole IP packets it treats QUIC and TCP alike: retransmission and
// head-of-line blocking happen in the endpoints' own stacks.
//
// The model (docs/BENCHMARKS.md repeats it): each direction is a queue of
// at most Limit packets ordered by release time. A packet arriving at t is
// lost with probability Loss; otherwise it is released at t + Delay +
// U(-Jitter, +Jitter), never before t. Without jitter release times rise
// with arrival, so packets never reorder; with jitter they may, as on a
// real path. A packet arriving at a full queue is dropped (tail drop) and
// counted apart from random loss. There is no bandwidth limit and no
// correlated loss.
//
// It imports nothing of h3infer; only cmd/h3infer and tests use it.
package netemu
