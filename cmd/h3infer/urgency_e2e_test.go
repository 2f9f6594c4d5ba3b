package main

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// firstToken posts a streaming chat at the given Priority and returns when
// its first content token arrived, then reads the stream to its end.
func firstToken(t testing.TB, ctx context.Context, c *http.Client, url, priority string, maxTokens int) (time.Time, error) {
	b, _ := json.Marshal(chatBody(maxTokens, true))
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(string(b)))
	if err != nil {
		return time.Time{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Priority", priority)
	resp, err := c.Do(req)
	if err != nil {
		return time.Time{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return time.Time{}, &statusError{resp.Status}
	}
	var at time.Time
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if at.IsZero() && strings.Contains(sc.Text(), `"content":"`) && !strings.Contains(sc.Text(), `"content":""`) {
			at = time.Now()
		}
	}
	return at, sc.Err()
}

type statusError struct{ status string }

func (e *statusError) Error() string { return "status " + e.status }

// TestEndToEndUrgentBeforeQueuedBulk floods two single-slot workers with
// bulk (u=6) streams, then sends one u=0 request: it must take one of the
// first slots that free up, ahead of the bulk requests queued before it.
func TestEndToEndUrgentBeforeQueuedBulk(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "config.json")
	// The test needs a backlog: admission by count keeps the queued bulk
	// requests that admission by predicted delay would refuse (503) on a
	// loaded machine, where 12 streams of 200 tokens on two single-slot
	// workers predict more than max_queue_delay. The order is what is
	// tested here; admission has its own tests.
	if err := os.WriteFile(cfg, []byte(`{"workers": {"slots": 1}, "scheduler": {"admission": "count"}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, "--config", cfg)
	c := s.h3Client(t)
	url := s.base + "/v1/chat/completions"
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	const bulk = 12
	var (
		mu     sync.Mutex
		starts []time.Time
		wg     sync.WaitGroup
	)
	for range bulk {
		wg.Go(func() {
			at, err := firstToken(t, ctx, c, url, "u=6", 200)
			if err != nil {
				t.Errorf("bulk request: %v", err)
				return
			}
			mu.Lock()
			starts = append(starts, at)
			mu.Unlock()
		})
	}
	// The scheduler's own queues feed the gauge, by the urgency given.
	waitForMetric(t, s, `h3infer_queue_depth{urgency="6"}`, 6)
	// What may not pass the urgent request is counted from when the
	// scheduler holds it, not from when the client sent it: on a loaded
	// machine a slot can free, and rightly go to a queued bulk request,
	// while the urgent one is still on its way. A watcher polls the
	// scheduler's queue for it; observing it late only shortens the
	// window counted.
	var (
		queuedAt time.Time
		watch    sync.WaitGroup
	)
	watchCtx, stopWatch := context.WithCancel(ctx)
	watch.Go(func() {
		for watchCtx.Err() == nil {
			if v, err := metricValue(s, `h3infer_queue_depth{urgency="0"}`); err == nil && v >= 1 {
				queuedAt = time.Now()
				return
			}
			time.Sleep(time.Millisecond)
		}
	})
	sent := time.Now()
	urgentAt, err := firstToken(t, ctx, c, url, "u=0", 8)
	stopWatch()
	watch.Wait()
	if err != nil {
		t.Fatalf("urgent request: %v", err)
	}
	wg.Wait()
	if queuedAt.IsZero() {
		// Granted before the watcher saw it queued: nothing can have
		// passed it in the queue.
		queuedAt = urgentAt
	}

	slices.SortFunc(starts, func(a, b time.Time) int { return a.Compare(b) })
	var after, passed int
	for _, at := range starts {
		if at.After(sent) {
			after++
		}
		if at.After(queuedAt) && at.Before(urgentAt) {
			passed++
		}
	}
	t.Logf("urgent first token %s after sending, %s after it was seen queued; %d bulk streams started after it was sent, %d between its queueing and its first token",
		urgentAt.Sub(sent), urgentAt.Sub(queuedAt), after, passed)
	if after < 4 {
		t.Fatalf("only %d bulk requests were still queued when the urgent one was sent; the test needs a backlog", after)
	}
	// Each of the two workers may hand its slot to a bulk request granted
	// just before the urgent one was queued; nothing queued may pass it
	// after.
	if passed > 2 {
		t.Errorf("%d queued bulk requests started before the urgent one; want at most 2 (one per worker in flight)", passed)
	}
}

// waitForMetric polls /metrics until name reaches at least want.
func waitForMetric(t testing.TB, s *server, name string, want float64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for metric(t, s, name) < want {
		if time.Now().After(deadline) {
			t.Fatalf("%s stayed below %v\n%s", name, want, s.stderr)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
