package gateway

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"h3infer/infer"
	"h3infer/scheduler"
)

// pacedScheduler answers every request with n tokens produced every
// interval, as a decoding worker would, and records when each was made.
type pacedScheduler struct {
	n        int
	interval time.Duration
	mu       sync.Mutex
	made     []time.Time // of the latest stream, by token index
}

type pacedStream struct {
	events chan infer.Event
	stop   chan struct{}
	done   sync.WaitGroup
	once   sync.Once
}

func (p *pacedScheduler) Submit(ctx context.Context, r *scheduler.Request) (Dispatch, scheduler.Admission, error) {
	st := &pacedStream{events: make(chan infer.Event, p.n+1), stop: make(chan struct{})}
	p.mu.Lock()
	p.made = make([]time.Time, p.n)
	p.mu.Unlock()
	st.done.Go(func() {
		t := time.NewTicker(p.interval)
		defer t.Stop()
		for i := range p.n {
			select {
			case <-st.stop:
				return
			case <-t.C:
			}
			p.mu.Lock()
			p.made[i] = time.Now()
			p.mu.Unlock()
			// A 24-byte token, the size docs/BENCHMARKS.md ("Coalescing") measures.
			st.events <- infer.Event{Token: infer.Token{Count: 1, Text: fmt.Sprintf("tok%04d_%015d", i, 0)}}
		}
		st.events <- done(infer.FinishLength, 2, uint32(p.n))
	})
	return st, fakeAdmission(r), nil
}

func (p *pacedScheduler) madeAt(i int) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.made[i]
}

func (s *pacedStream) ID() uint64                 { return 1 }
func (s *pacedStream) Events() <-chan infer.Event { return s.events }
func (s *pacedStream) Close() {
	s.once.Do(func() { close(s.stop) })
	s.done.Wait()
}

// BenchmarkCoalescing streams 200 tokens made every 2 ms at u=5 (10 ms
// window) beside the same at u=0 (every token written at once) over real
// HTTP/3 on loopback, one fresh connection per stream, and reports from the
// client's quic-go connection statistics the packets it received (data) and
// sent (almost all ACKs) per 100 tokens, the gaps between tokens as read,
// and how long each token waited between being made and being read.
// Run with -benchtime 3x.
func BenchmarkCoalescing(b *testing.B) {
	const n = 200
	paced := &pacedScheduler{n: n, interval: 2 * time.Millisecond}
	h := newHarness(b, nil)
	h.gw.sched = paced
	tlsConf := &tls.Config{RootCAs: h.pool}
	for _, u := range []string{"0", "5"} {
		b.Run("u="+u, func(b *testing.B) {
			var dataPkts, ackPkts float64
			var gaps, waits []time.Duration
			streams := 0
			for b.Loop() {
				d, a, g, w := coalescedStream(b, h, tlsConf, paced, u)
				dataPkts += d
				ackPkts += a
				gaps = append(gaps, g...)
				waits = append(waits, w...)
				streams++
			}
			per100 := float64(streams*n) / 100
			b.ReportMetric(dataPkts/per100, "data_pkts/100tok")
			b.ReportMetric(ackPkts/per100, "acks/100tok")
			b.ReportMetric(ms(pct(gaps, 50)), "itl_p50_ms")
			b.ReportMetric(ms(pct(gaps, 99)), "itl_p99_ms")
			b.ReportMetric(ms(pct(waits, 99)), "held_p99_ms")
			b.ReportMetric(ms(pct(waits, 50)), "held_p50_ms")
		})
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

// coalescedStream runs one stream on a fresh connection and returns the
// packets the client received and sent during it, the gaps between token
// events, and each token's wait from being made to being read.
func coalescedStream(b *testing.B, h *harness, tlsConf *tls.Config, paced *pacedScheduler, u string) (data, acks float64, gaps, waits []time.Duration) {
	var conn *quic.Conn
	tr := &http3.Transport{
		TLSClientConfig: tlsConf,
		Dial: func(ctx context.Context, addr string, tc *tls.Config, qc *quic.Config) (*quic.Conn, error) {
			c, err := quic.DialAddrEarly(ctx, addr, tc, qc)
			conn = c
			return c, err
		},
	}
	defer tr.Close()
	client := &http.Client{Transport: tr}
	// Establish the connection first so the handshake is not counted.
	if resp, err := client.Get(h.base + "/v1/models"); err != nil {
		b.Fatal(err)
	} else {
		resp.Body.Close()
	}
	before := conn.ConnectionStats()
	req, _ := http.NewRequest(http.MethodPost, h.base+"/v1/chat/completions", strings.NewReader(chatStream))
	req.Header.Set("Priority", "u="+u)
	req.Header.Set("Authorization", "Bearer "+bearerOfCredential(b, h.cred))
	resp, err := client.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	sc := bufio.NewScanner(resp.Body)
	var last time.Time
	for sc.Scan() {
		line := sc.Text()
		i := strings.Index(line, `"content":"tok`)
		if i < 0 {
			continue
		}
		now := time.Now()
		idx, err := strconv.Atoi(line[i+len(`"content":"tok`) : i+len(`"content":"tok`)+4])
		if err != nil {
			b.Fatal(err)
		}
		waits = append(waits, now.Sub(paced.madeAt(idx)))
		if !last.IsZero() {
			gaps = append(gaps, now.Sub(last))
		}
		last = now
	}
	resp.Body.Close()
	if len(waits) != paced.n {
		b.Fatalf("read %d tokens, want %d", len(waits), paced.n)
	}
	// Let the last ACKs go out before reading the counters.
	time.Sleep(50 * time.Millisecond)
	after := conn.ConnectionStats()
	return float64(after.PacketsReceived - before.PacketsReceived), float64(after.PacketsSent - before.PacketsSent), gaps, waits
}
