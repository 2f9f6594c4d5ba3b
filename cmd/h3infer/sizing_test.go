package main

import (
	"strings"
	"testing"

	"h3infer/workerpool"
)

// The ready banner says how many workers and slots were chosen and why,
// naming the key that changes each.
func TestSizingBanner(t *testing.T) {
	derived := []workerpool.ProcessStatus{{Slots: 32, SlotsFit: 128}}
	for name, tc := range map[string]struct {
		json    string
		cpus    int
		gpu     bool
		workers []workerpool.ProcessStatus
		want    []string
	}{
		"defaults": {json: `{}`, cpus: 2, workers: derived, want: []string{
			"Workers: 2 (one per CPU of 2, at most 8; workers.count)",
			"Slots: 32 per worker, 1 kept for urgent requests (scheduler.urgent_reserve):",
			"128 sequences at full context fit in workers.kv_cache_bytes (1 GiB), taken within 4..32",
		}},
		"threads per worker": {json: `{"workers": {"intra_op_threads": 2}}`, cpus: 8, workers: derived, want: []string{
			"Workers: 4 (one per 2 CPUs of 8, as workers.intra_op_threads asks, at most 8; workers.count)",
		}},
		"gpu": {json: `{}`, cpus: 8, gpu: true, workers: derived, want: []string{
			"Workers: 1 (a model runs on a GPU",
		}},
		"set": {json: `{"workers": {"count": 3, "slots": 8, "kv_cache_bytes": 3145728}, "scheduler": {"urgent_reserve": 0}}`, cpus: 2,
			workers: []workerpool.ProcessStatus{{Slots: 8}}, want: []string{
				"Workers: 3 (workers.count)",
				"Slots: 8 per worker (workers.slots)\n",
			}},
	} {
		t.Run(name, func(t *testing.T) {
			c, err := loadConfig(writeConfig(t, tc.json))
			if err != nil {
				t.Fatal(err)
			}
			if c.Workers.Count == 0 {
				// What withDefaults would take from this machine's CPUs.
				c.Workers.Count = workerpool.AutoWorkers(tc.cpus, max(c.Workers.IntraOpThreads, 1), tc.gpu)
			}
			c = c.withDefaults()
			got := sizing(c, tc.cpus, tc.gpu, tc.workers)
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("banner lacks %q:\n%s", w, got)
				}
			}
		})
	}
}
