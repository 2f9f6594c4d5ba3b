package scheduler

import (
	"context"
	"errors"
	"testing"

	"h3infer/infer"
	"h3infer/priority"
)

// A request for n choices takes n slots of one backend: it goes where n
// are free, a request that would overfill every backend waits until
// enough are freed, and its Close gives all n back.
func TestChoicesTakeTheirSlots(t *testing.T) {
	small, large := newFakeWorker(0, 2), newFakeWorker(1, 4)
	s, _ := newTestScheduler(t, Config{}, small, large)
	wide, _, err := s.Submit(context.Background(), &Request{Job: infer.Request{N: 3}})
	if err != nil {
		t.Fatal(err)
	}
	if got := wide.BackendID(); got != large.id {
		t.Fatalf("3 choices went to backend %d, want the one with 4 slots", got)
	}
	if r := s.Stats().Running; r != 3 {
		t.Errorf("%d slots in use, want 3", r)
	}
	// Two on the small one, one on the large one's last slot: full.
	for range 3 {
		st, _, err := s.Submit(context.Background(), &Request{})
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
	}
	if r := s.Stats().Running; r != 6 {
		t.Fatalf("%d slots in use, want all 6", r)
	}
	// A request for 2 waits; freeing the 3 choices' slots starts it.
	waiting := submitAsync(t, s, context.Background(), &Request{Job: infer.Request{N: 2}})
	wide.Close()
	r := recv(t, waiting)
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.st.Close()
	if got := r.st.BackendID(); got != large.id {
		t.Errorf("2 choices went to backend %d, want %d", got, large.id)
	}
	if got := s.Stats().Running; got != 5 {
		t.Errorf("%d slots in use, want 5", got)
	}
}

// A request for more choices than any backend of its model could run at
// its urgency is refused at once, not queued until its deadline: the
// urgent reserve counts.
func TestChoicesOverEveryBackendRefused(t *testing.T) {
	s, _ := newTestScheduler(t, Config{UrgentReserve: new(1)}, newFakeWorker(0, 4), newFakeWorker(1, 2))
	for _, tc := range []struct {
		n    uint32
		u    priority.Urgency
		most int // 0: admitted
	}{
		{n: 3, u: 3},
		{n: 4, u: 3, most: 3},
		{n: 4, u: 0},
		{n: 5, u: 0, most: 4},
	} {
		st, _, err := s.Submit(context.Background(), &Request{Urgency: tc.u, Job: infer.Request{N: tc.n}})
		var ce *ChoicesError
		switch {
		case tc.most == 0 && err != nil:
			t.Errorf("n %d at urgency %d: %v", tc.n, tc.u, err)
		case tc.most == 0:
			st.Close()
		case !errors.As(err, &ce) || ce.Most != tc.most || ce.Choices != int(tc.n):
			t.Errorf("n %d at urgency %d: got %v, want a ChoicesError with at most %d", tc.n, tc.u, err, tc.most)
		}
	}
}

// A wide request that no ready backend can place does not hold back the
// narrower requests of its model queued behind it: the reviewer's case, a
// large backend restarting and a small one with free slots.
func TestChoicesDoNotBlockNarrowerRequests(t *testing.T) {
	large, small := newFakeWorker(0, 8), newFakeWorker(1, 2)
	large.ready.Store(false)
	s, _ := newTestScheduler(t, Config{}, large, small)
	busy, _, err := s.Submit(context.Background(), &Request{})
	if err != nil {
		t.Fatal(err)
	}
	// One of the small backend's two slots is free; 4 choices need the
	// large one and wait for it.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	wide := submitAsync(t, s, ctx, &Request{Job: infer.Request{N: 4}})
	// Queued behind the wide one, or placed at once: either way placed.
	narrow := make(chan result, 1)
	go func() {
		st, _, err := s.Submit(context.Background(), &Request{})
		narrow <- result{st, err}
	}()
	r := recv(t, narrow)
	if r.err != nil {
		t.Fatalf("the narrow request behind the wide one: %v", r.err)
	}
	r.st.Close()
	busy.Close()
	cancel()
	if r := recv(t, wide); r.err == nil {
		r.st.Close()
		t.Error("the wide request was placed with the large backend down")
	}
}
