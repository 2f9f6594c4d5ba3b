package ort

import (
	"strings"
	"testing"

	"h3infer/internal/onnxgen"
)

// Rows of different lengths that join and leave a batch at different steps
// get, at every step, the logits they get alone in a batch of one.
func TestBatchRowsMatchAloneLogits(t *testing.T) {
	for _, layout := range []string{onnxgen.KVCacheConcat, onnxgen.KVCacheAppend} {
		t.Run("kv_cache="+layout, func(t *testing.T) {
			m := loadRandomModel(t, onnxgen.Options{Layers: 2, Heads: 4, Hidden: 64, Context: 256, Seed: 7, KVCache: layout})
			testBatchRowsMatchAlone(t, m, nil)
		})
	}
}

// The append layout computes what the concat layout computes: the same
// weights in either graph give each row the same logits at every step,
// batched with rows that join and leave.
func TestAppendLayoutMatchesConcat(t *testing.T) {
	opts := onnxgen.Options{Layers: 2, Heads: 4, Hidden: 64, Context: 256, Seed: 7}
	concat := loadRandomModel(t, opts)
	opts.KVCache = onnxgen.KVCacheAppend
	testBatchRowsMatchAlone(t, loadRandomModel(t, opts), concat)
}

// testBatchRowsMatchAlone runs rows of different lengths through one batch
// of m, joining and leaving at different steps, and each alone in a batch
// of its own, of ref when it is set (else of m); at every step their
// logits must agree.
func testBatchRowsMatchAlone(t *testing.T, m, ref *Model) {
	if ref == nil {
		ref = m
	}
	type pair struct {
		solo           *batch
		batched, alone []float32 // logits of the latest pass
		last           int       // the token both are fed next
		steps          int       // decode steps left
	}
	shared := m.newBatch()
	defer shared.close()
	var rows []*pair // shared's rows, in its order
	join := func(prompt string, steps int) {
		ids := m.Encode(prompt)
		p := &pair{solo: ref.newBatch(), steps: steps}
		t.Cleanup(p.solo.close)
		var kv [][]byte
		var err error
		if p.batched, kv, err = m.Prefill(ids); err != nil {
			t.Fatal(err)
		}
		shared.join(kv, len(ids))
		if p.alone, kv, err = ref.Prefill(ids); err != nil {
			t.Fatal(err)
		}
		p.solo.join(kv, len(ids))
		p.last = greedy(p.batched)
		rows = append(rows, p)
	}
	arrivals := map[int][]struct {
		prompt string
		steps  int
	}{
		0:  {{"The gateway", 30}, {"x", 12}},
		3:  {{strings.Repeat("a long prompt ", 6), 10}},
		5:  {{"mid", 25}},
		14: {{"late arrival, longer than the rest so far: " + strings.Repeat("z", 60), 8}},
	}
	worst := 0.0
	for step := 0; step < 40; step++ {
		for _, a := range arrivals[step] {
			join(a.prompt, a.steps)
		}
		if len(rows) == 0 {
			break
		}
		next := make([]int, len(rows))
		for r, p := range rows {
			next[r] = p.last
		}
		logits, err := shared.step(next)
		if err != nil {
			t.Fatal(err)
		}
		v := len(logits) / len(rows)
		var leaving []int
		for r, p := range rows {
			p.batched = logits[r*v : (r+1)*v]
			if p.alone, err = p.solo.step([]int{p.last}); err != nil {
				t.Fatal(err)
			}
			d := maxAbsDiff(p.batched, p.alone)
			worst = max(worst, d)
			if d > 1e-4 {
				t.Fatalf("step %d: a row's logits differ from its run alone by %g", step, d)
			}
			p.last = greedy(p.batched)
			if p.steps--; p.steps == 0 {
				leaving = append(leaving, r)
			}
		}
		// Highest first: the last row, which takes a leaving row's
		// number, is then never one that leaves too.
		for i := len(leaving) - 1; i >= 0; i-- {
			r, last := leaving[i], len(rows)-1
			shared.leave(r)
			rows[r] = rows[last]
			rows = rows[:last]
		}
	}
	t.Logf("largest logit difference, batched against alone: %g", worst)
	if len(shared.n) != 0 || shared.cols != 0 {
		t.Errorf("emptied batch keeps %d rows, %d columns", len(shared.n), shared.cols)
	}
}
