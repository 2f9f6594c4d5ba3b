package gateway

import (
	"context"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
)

// quicStats exports quic-go's per-connection counters summed over every
// HTTP/3 connection the gateway has served, so that the effect of stream
// priorities and token coalescing shows in /metrics. Closed connections
// leave their final counts in the totals.
type quicStats struct {
	mu       sync.Mutex
	live     map[*quic.Conn]struct{}
	closed   quic.ConnectionStats // sums of the packet counters over closed connections
	accepted uint64

	sent, lost, received, conns *prometheus.Desc
}

func newQUICStats() *quicStats {
	return &quicStats{
		live: map[*quic.Conn]struct{}{},
		sent: prometheus.NewDesc("h3infer_quic_packets_sent_total",
			"QUIC packets the gateway sent, lost ones included.", nil, nil),
		lost: prometheus.NewDesc("h3infer_quic_packets_lost_total",
			"QUIC packets the gateway declared lost.", nil, nil),
		received: prometheus.NewDesc("h3infer_quic_packets_received_total",
			"QUIC packets received from clients; on token streams these are almost all ACKs.", nil, nil),
		conns: prometheus.NewDesc("h3infer_quic_connections_total",
			"HTTP/3 connections accepted.", nil, nil),
	}
}

// track counts c from now on. The AfterFunc runs once, when c closes, and
// only moves c's final counts into the totals.
func (q *quicStats) track(c *quic.Conn) {
	q.mu.Lock()
	q.live[c] = struct{}{}
	q.accepted++
	q.mu.Unlock()
	context.AfterFunc(c.Context(), func() {
		s := c.ConnectionStats()
		q.mu.Lock()
		defer q.mu.Unlock()
		delete(q.live, c)
		q.closed.PacketsSent += s.PacketsSent
		q.closed.PacketsLost += s.PacketsLost
		q.closed.PacketsReceived += s.PacketsReceived
	})
}

func (q *quicStats) Describe(ch chan<- *prometheus.Desc) {
	ch <- q.sent
	ch <- q.lost
	ch <- q.received
	ch <- q.conns
}

func (q *quicStats) Collect(ch chan<- prometheus.Metric) {
	q.mu.Lock()
	t, accepted := q.closed, q.accepted
	for c := range q.live {
		s := c.ConnectionStats()
		t.PacketsSent += s.PacketsSent
		t.PacketsLost += s.PacketsLost
		t.PacketsReceived += s.PacketsReceived
	}
	q.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(q.sent, prometheus.CounterValue, float64(t.PacketsSent))
	ch <- prometheus.MustNewConstMetric(q.lost, prometheus.CounterValue, float64(t.PacketsLost))
	ch <- prometheus.MustNewConstMetric(q.received, prometheus.CounterValue, float64(t.PacketsReceived))
	ch <- prometheus.MustNewConstMetric(q.conns, prometheus.CounterValue, float64(accepted))
}
