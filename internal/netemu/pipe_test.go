package netemu

import (
	"testing"
	"time"
)

var t0 = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

func TestPipeHoldsForDelayInOrder(t *testing.T) {
	p := newPipe(Direction{Delay: 25 * time.Millisecond})
	for i := range 10 {
		// Ten packets 1 ms apart.
		if v := p.push([]byte{byte(i)}, t0.Add(time.Duration(i)*time.Millisecond)); v != queued {
			t.Fatalf("packet %d: got verdict %v, want queued", i, v)
		}
	}
	if _, ok := p.pop(t0.Add(25*time.Millisecond - 1)); ok {
		t.Fatal("a packet left before its delay")
	}
	for i := range 10 {
		due := t0.Add(time.Duration(i)*time.Millisecond + 25*time.Millisecond)
		if next, _ := p.next(); !next.Equal(due) {
			t.Fatalf("packet %d: next release %v, want %v", i, next.Sub(t0), due.Sub(t0))
		}
		if _, ok := p.pop(due); !ok {
			t.Fatalf("packet %d not released at its due time", i)
		}
	}
	if _, ok := p.next(); ok {
		t.Fatal("packets left over")
	}
}

func TestPipeKeepsOrderAtEqualDueTimes(t *testing.T) {
	p := newPipe(Direction{Delay: time.Millisecond})
	for i := range 100 {
		p.push([]byte{byte(i)}, t0) // same arrival instant
	}
	for i := range 100 {
		pkt, ok := p.pop(t0.Add(time.Millisecond))
		if !ok || pkt[0] != byte(i) {
			t.Fatalf("position %d: got %v %v, want packet %d", i, pkt, ok, i)
		}
	}
}

func TestPipeLossRateAndSeed(t *testing.T) {
	const n = 100_000
	for _, loss := range []float64{0, 0.01, 0.03, 1} {
		p := newPipe(Direction{Loss: loss, Limit: n, Seed: 7})
		for i := range n {
			p.push([]byte{0}, t0.Add(time.Duration(i)))
		}
		got := float64(p.stats.Lost) / n
		// Binomial standard deviation at 3% of 100,000 is 0.054%; allow
		// five of them. The seed fixes the outcome, so this cannot flake.
		if d := got - loss; d > 0.003 || d < -0.003 {
			t.Errorf("loss %v: dropped %.4f of packets", loss, got)
		}
		if p.stats.Lost+uint64(len(p.q)) != n || p.stats.Received != n {
			t.Errorf("loss %v: %d lost + %d held != %d received", loss, p.stats.Lost, len(p.q), p.stats.Received)
		}
	}

	drops := func(seed uint64) []bool {
		p := newPipe(Direction{Loss: 0.5, Seed: seed})
		var d []bool
		for range 64 {
			d = append(d, p.push([]byte{0}, t0) == lost)
			p.pop(t0)
		}
		return d
	}
	a, b, c := drops(1), drops(1), drops(2)
	same := func(x, y []bool) bool {
		for i := range x {
			if x[i] != y[i] {
				return false
			}
		}
		return true
	}
	if !same(a, b) {
		t.Error("the same seed gave different losses")
	}
	if same(a, c) {
		t.Error("different seeds gave the same 64 losses")
	}
}

func TestPipeTailDropsAtLimit(t *testing.T) {
	p := newPipe(Direction{Delay: time.Second, Limit: 3})
	var got []verdict
	for range 5 {
		got = append(got, p.push([]byte{0}, t0))
	}
	want := []verdict{queued, queued, queued, overflow, overflow}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("verdicts %v, want %v", got, want)
		}
	}
	if p.stats.Overflow != 2 || p.stats.Lost != 0 {
		t.Errorf("stats %+v, want 2 overflow and 0 lost", p.stats)
	}
	// Room again once one leaves.
	p.pop(t0.Add(time.Second))
	if v := p.push([]byte{0}, t0.Add(time.Second)); v != queued {
		t.Errorf("after a release: verdict %v, want queued", v)
	}
	if newPipe(Direction{}).cfg.Limit != DefaultLimit {
		t.Error("a zero limit is not the default")
	}
}

func TestPipeJitterBoundsAndReorders(t *testing.T) {
	const delay, jitter = 25 * time.Millisecond, 5 * time.Millisecond
	p := newPipe(Direction{Delay: delay, Jitter: jitter, Limit: 10_000, Seed: 3})
	const n = 1000
	for i := range n {
		pkt := []byte{byte(i >> 8), byte(i)}
		p.push(pkt, t0.Add(time.Duration(i)*100*time.Microsecond))
	}
	reordered := 0
	last := -1
	for range n {
		due, _ := p.next()
		pkt, ok := p.pop(due)
		if !ok {
			t.Fatal("next packet not released at its own due time")
		}
		i := int(pkt[0])<<8 | int(pkt[1])
		held := due.Sub(t0.Add(time.Duration(i) * 100 * time.Microsecond))
		if held < delay-jitter || held > delay+jitter {
			t.Fatalf("packet %d held %s, want within %s ± %s", i, held, delay, jitter)
		}
		if i < last {
			reordered++
		}
		last = i
	}
	// 10 ms of jitter spread over packets 0.1 ms apart must reorder some.
	if reordered == 0 {
		t.Error("jitter reordered nothing")
	}

	// Jitter larger than the delay never sends a packet back in time.
	p = newPipe(Direction{Jitter: 5 * time.Millisecond, Seed: 1})
	for range 200 {
		p.push([]byte{0}, t0)
	}
	if due, _ := p.next(); due.Before(t0) {
		t.Errorf("released %s before arrival", t0.Sub(due))
	}
}

func TestDirectionValidate(t *testing.T) {
	for name, d := range map[string]Direction{
		"negative delay":  {Delay: -1},
		"negative jitter": {Jitter: -1},
		"loss over 1":     {Loss: 1.5},
		"negative loss":   {Loss: -0.1},
		"negative limit":  {Limit: -1},
	} {
		if d.Validate() == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if err := (Direction{Delay: time.Millisecond, Loss: 0.03}).Validate(); err != nil {
		t.Errorf("a valid direction: %v", err)
	}
}
