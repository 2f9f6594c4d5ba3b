package netemu

import (
	"math"
	"slices"
	"strings"
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

// lossPattern pushes n packets 1 µs apart through a pipe, releasing
// those due, and reports which were lost.
func lossPattern(d Direction, n int) []bool {
	p := newPipe(d)
	lostAt := make([]bool, n)
	for i := range lostAt {
		now := t0.Add(time.Duration(i) * time.Microsecond)
		lostAt[i] = p.push([]byte{0}, now) == lost
		p.pop(now)
	}
	return lostAt
}

// lossRuns returns the fraction of packets lost and the mean length of a
// run of consecutive losses.
func lossRuns(lostAt []bool) (rate, meanRun float64) {
	losses, runs := 0, 0
	for i, l := range lostAt {
		if !l {
			continue
		}
		losses++
		if i == 0 || !lostAt[i-1] {
			runs++
		}
	}
	return float64(losses) / float64(len(lostAt)), float64(losses) / float64(runs)
}

func TestPipeBurstLossRateAndRunLength(t *testing.T) {
	const n = 200_000
	tests := map[string]struct {
		loss, burst float64
		wantRun     float64
	}{
		// Independent losses run 1/(1-loss) packets on average.
		"bernoulli 3%":         {0.03, 0, 1 / 0.97},
		"burst 1 is bernoulli": {0.03, 1, 1 / 0.97},
		"bernoulli 20%":        {0.20, 0, 1 / 0.8},
		"3% in bursts of 4":    {0.03, 4, 4},
		"20% in bursts of 4":   {0.20, 4, 4},
		"10% in bursts of 10":  {0.10, 10, 10},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			// Bernoulli is the chain that leaves the bad state with
			// probability 1-loss, so one formula bounds both. Losses
			// are correlated over 1/(1-λ) packets, which widens the
			// spread of their rate by (1+λ)/(1-λ) over a binomial one;
			// run lengths are geometric. Allow four standard
			// deviations: the seed fixes the outcome, so this cannot
			// flake, and it is tight enough to catch a chain that
			// forgot the 1/(1-loss) in its entry probability.
			r := 1 / tc.wantRun
			p := tc.loss * r / (1 - tc.loss)
			lambda := 1 - p - r
			rateTol := 4 * math.Sqrt(tc.loss*(1-tc.loss)/n*(1+lambda)/(1-lambda))
			runTol := 4 * math.Sqrt(1-r) / r / math.Sqrt(n*tc.loss/tc.wantRun)

			lostAt := lossPattern(Direction{Loss: tc.loss, Burst: tc.burst, Seed: 11}, n)
			rate, run := lossRuns(lostAt)
			if math.Abs(rate-tc.loss) > rateTol {
				t.Errorf("lost %.5f of packets, want %.5f ± %.5f", rate, tc.loss, rateTol)
			}
			if math.Abs(run-tc.wantRun) > runTol {
				t.Errorf("mean run of losses %.3f packets, want %.3f ± %.3f", run, tc.wantRun, runTol)
			}
			again := lossPattern(Direction{Loss: tc.loss, Burst: tc.burst, Seed: 11}, n)
			if !slices.Equal(lostAt, again) {
				t.Error("the same seed gave different losses")
			}
			if slices.Equal(lostAt, lossPattern(Direction{Loss: tc.loss, Burst: tc.burst, Seed: 12}, n)) {
				t.Error("a different seed gave the same losses")
			}
			// A full queue turns every packet the chain keeps into an
			// overflow, and must not move the chain's draws.
			full := Direction{Loss: tc.loss, Burst: tc.burst, Seed: 11, Delay: time.Hour, Limit: 1}
			if !slices.Equal(lostAt, lossPattern(full, n)) {
				t.Error("a full queue changed which packets were lost")
			}
		})
	}

	// Burst 1 is today's Bernoulli loss draw for draw, not merely alike.
	if !slices.Equal(lossPattern(Direction{Loss: 0.1, Seed: 5}, 10_000), lossPattern(Direction{Loss: 0.1, Burst: 1, Seed: 5}, 10_000)) {
		t.Error("burst 1 lost other packets than burst 0")
	}
}

func TestDirectionValidateBurst(t *testing.T) {
	for name, tc := range map[string]struct {
		d   Direction
		key string
	}{
		"burst below 1":       {Direction{Burst: 0.5}, "burst:"},
		"negative burst":      {Direction{Burst: -2}, "burst:"},
		"burst NaN":           {Direction{Burst: math.NaN()}, "burst:"},
		"burst infinite":      {Direction{Burst: math.Inf(1)}, "burst:"},
		"all lost in bursts":  {Direction{Loss: 1, Burst: 4}, "loss:"},
		"bursts back to back": {Direction{Loss: 0.7, Burst: 2}, "loss:"}, // at most 2/3
	} {
		err := tc.d.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("%s: got %v, want an error naming %s", name, err, tc.key)
		}
	}
	for name, d := range map[string]Direction{
		"all lost independently": {Loss: 1, Burst: 1},
		"bursts of 4":            {Loss: 0.03, Burst: 4},
		"the highest loss":       {Loss: 2.0 / 3, Burst: 2},
	} {
		if err := d.Validate(); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// releases pops every packet at its own due time and returns those times
// as offsets from t0, packet by packet in the order they left.
func releases(p *pipe) []time.Duration {
	var got []time.Duration
	for {
		due, ok := p.next()
		if !ok {
			return got
		}
		p.pop(due)
		got = append(got, due.Sub(t0))
	}
}

func TestPipeRateSerializes(t *testing.T) {
	const ms = time.Millisecond
	// 1,000 bytes at 8 Mbit/s take 1 ms on the wire.
	p := newPipe(Direction{Delay: 10 * ms, Rate: 8_000_000})
	for range 5 {
		p.push(make([]byte, 1000), t0)
	}
	waiting := func(at time.Duration, want int) {
		t.Helper()
		if got := p.waiting(t0.Add(at)); got != want {
			t.Errorf("waiting at %s: got %d, want %d", at, got, want)
		}
	}
	// The first starts at once; each other waits until the one before
	// it is done.
	waiting(0, 4)
	waiting(ms-1, 4)
	waiting(ms, 3)
	// One arriving while the link is busy waits its turn, and a larger
	// one takes longer: 1,500 bytes are 1.5 ms.
	p.push(make([]byte, 1500), t0.Add(2500*time.Microsecond))
	waiting(3*ms, 2)
	waiting(5*ms-1, 1)
	waiting(5*ms, 0)
	want := []time.Duration{11 * ms, 12 * ms, 13 * ms, 14 * ms, 15 * ms, 16500 * time.Microsecond}
	if got := releases(p); !slices.Equal(got, want) {
		t.Errorf("released at %v, want %v", got, want)
	}

	// An idle link starts the next packet when it arrives, not when the
	// last one ended.
	p.push(make([]byte, 1000), t0.Add(100*ms))
	if got, want := releases(p), []time.Duration{111 * ms}; !slices.Equal(got, want) {
		t.Errorf("after idling: released at %v, want %v", got, want)
	}

	// Serialization rounds up, so the link never beats its rate: 1 byte
	// at 3 bit/s is 8/3 s.
	p = newPipe(Direction{Rate: 3})
	p.push([]byte{0}, t0)
	p.push([]byte{0}, t0)
	if got, want := releases(p), []time.Duration{2666666667, 5333333334}; !slices.Equal(got, want) {
		t.Errorf("at 3 bit/s: released at %v, want %v", got, want)
	}
}

func TestPipeRateQueueTailDrops(t *testing.T) {
	const ms = time.Millisecond
	p := newPipe(Direction{Rate: 8_000_000, RateQueue: 3})
	var got []verdict
	for range 6 {
		got = append(got, p.push(make([]byte, 1000), t0))
	}
	// One on the wire and three waiting; the rest find the queue full.
	want := []verdict{queued, queued, queued, queued, overflow, overflow}
	if !slices.Equal(got, want) {
		t.Fatalf("verdicts %v, want %v", got, want)
	}
	if p.stats.Overflow != 2 || p.stats.Lost != 0 {
		t.Errorf("stats %+v, want 2 overflow and 0 lost", p.stats)
	}
	// At 1 ms the second packet goes on the wire, leaving one place.
	got = got[:0]
	for range 2 {
		got = append(got, p.push(make([]byte, 1000), t0.Add(ms)))
	}
	if want := []verdict{queued, overflow}; !slices.Equal(got, want) {
		t.Errorf("at 1 ms: verdicts %v, want %v", got, want)
	}
	// The dropped packets took no time on the wire: five went through,
	// 1 ms each.
	if got, want := releases(p), []time.Duration{1 * ms, 2 * ms, 3 * ms, 4 * ms, 5 * ms}; !slices.Equal(got, want) {
		t.Errorf("released at %v, want %v", got, want)
	}

	if q := newPipe(Direction{Rate: 1}).cfg.RateQueue; q != DefaultRateQueue {
		t.Errorf("a zero rate queue is %d, not the default %d", q, DefaultRateQueue)
	}
	// Without a rate nothing waits for the link, so nothing overflows
	// the rate queue.
	p = newPipe(Direction{RateQueue: 1})
	for i := range 10 {
		if v := p.push(make([]byte, 1000), t0); v != queued {
			t.Fatalf("no rate, packet %d: verdict %v, want queued", i, v)
		}
	}
}

func TestDirectionValidateRate(t *testing.T) {
	for name, tc := range map[string]struct {
		d   Direction
		key string
	}{
		"negative rate":       {Direction{Rate: -1}, "rate:"},
		"negative rate queue": {Direction{RateQueue: -1}, "rate_queue:"},
	} {
		err := tc.d.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("%s: got %v, want an error naming %s", name, err, tc.key)
		}
	}
	if err := (Direction{Rate: 10_000_000, RateQueue: 100}).Validate(); err != nil {
		t.Errorf("a valid direction: %v", err)
	}
}
