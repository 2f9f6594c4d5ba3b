package gateway

import (
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// idleConns bounds the idle HTTP/3 connections: those that have served a
// request and have none in a handler now. An idle connection costs memory
// (about 100 KB, most of it quic-go's and crypto/tls's state; see
// docs/BENCHMARKS.md, Scenario 3) and a phone that resumes later comes
// back in 0-RTT on a new one, so above the bound the gateway closes the
// connections idle longest with H3_NO_ERROR.
//
// The order is chosen against a client that wants others evicted:
//   - a connection with a request in a handler is never idle, so a bound
//     reached by one client cannot end another's running stream;
//   - a connection counts only once its first request has ended: one that
//     has sent none yet is bounded by AuthTimeout and MaxConnections, and
//     a newcomer is not closed in the moment between its handshake and
//     its first request because older ones are idle;
//   - connections whose requests have not passed the auth guard go before
//     authenticated ones, whatever their age: requests that fail auth
//     cannot keep a connection fresh;
//   - a client that keeps its connections barely active (a request now
//     and then on each) is bounded by MaxConnectionsPerSource and its
//     tenant's rate limits, not by this order.
type idleConns struct {
	max     int
	evicted prometheus.Counter

	mu sync.Mutex
	// unauthed holds idle connections with no authenticated request,
	// authed the others; each longest idle first.
	unauthed, authed idleList
}

func newIdleConns(max int, reg prometheus.Registerer) (*idleConns, error) {
	ic := &idleConns{
		max: max,
		evicted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "h3infer_connections_evicted_idle_total",
			Help: "Idle HTTP/3 connections closed with H3_NO_ERROR because more than gateway.max_idle_connections were idle.",
		}),
	}
	idle := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "h3infer_quic_connections_idle",
		Help: "HTTP/3 connections that have served a request and have none running now: those gateway.max_idle_connections bounds.",
	}, func() float64 { return float64(ic.len()) })
	for _, c := range []prometheus.Collector{ic.evicted, idle} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("gateway: register metrics: %w", err)
		}
	}
	return ic, nil
}

func (ic *idleConns) len() int {
	ic.mu.Lock()
	defer ic.mu.Unlock()
	return ic.unauthed.n + ic.authed.n
}

// update files c by its state now: at the back of its list if it is idle,
// in no list otherwise. served says a request of c has just ended. Callers
// call it after each change of c.active, so the last call sees the last
// count. When more connections are idle than the bound, it evicts the
// longest idle ones.
func (ic *idleConns) update(c *connGate, served bool) {
	var evict []*connGate
	ic.mu.Lock()
	if c.list != nil {
		c.list.remove(c)
	}
	c.served = c.served || served
	if !c.gone && !c.evicting && c.served && c.active.Load() == 0 {
		l := &ic.authed
		if !c.authed.Load() {
			l = &ic.unauthed
		}
		l.push(c)
		for ic.unauthed.n+ic.authed.n > ic.max {
			v := ic.unauthed.head
			if v == nil {
				v = ic.authed.head
			}
			v.list.remove(v)
			v.evicting = true
			evict = append(evict, v)
		}
	}
	ic.mu.Unlock()
	for _, v := range evict {
		// CONNECTION_CLOSE discards stream data not yet acknowledged:
		// the last response of a connection that has only just gone idle
		// gets the time closeWhenDelivered gives a drained one.
		time.AfterFunc(3*v.rtt()+closeLinger, func() { ic.close(v) })
	}
}

// close ends an evicted connection, unless a request arrived on it
// meanwhile: it is then filed again when its requests end.
func (ic *idleConns) close(c *connGate) {
	ic.mu.Lock()
	c.evicting = false
	if c.gone || c.active.Load() > 0 {
		ic.mu.Unlock()
		return
	}
	c.gone = true
	ic.mu.Unlock()
	ic.evicted.Inc()
	c.close()
}

// drop takes c out for good: its connection has ended.
func (ic *idleConns) drop(c *connGate) {
	ic.mu.Lock()
	defer ic.mu.Unlock()
	c.gone = true
	if c.list != nil {
		c.list.remove(c)
	}
}

// idleList is a doubly linked list threaded through the connections'
// gates, so that a connection going idle and busy allocates nothing.
type idleList struct {
	head, tail *connGate
	n          int
}

func (l *idleList) push(c *connGate) {
	c.list, c.prev, c.next = l, l.tail, nil
	if l.tail != nil {
		l.tail.next = c
	} else {
		l.head = c
	}
	l.tail = c
	l.n++
}

func (l *idleList) remove(c *connGate) {
	if c.prev != nil {
		c.prev.next = c.next
	} else {
		l.head = c.next
	}
	if c.next != nil {
		c.next.prev = c.prev
	} else {
		l.tail = c.prev
	}
	c.list, c.prev, c.next = nil, nil, nil
	l.n--
}
