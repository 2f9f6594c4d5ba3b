package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestUrgencyConfig(t *testing.T) {
	tests := map[string]struct {
		json string
		want []string // keys the errors must name; none: valid
	}{
		"defaults": {json: `{}`},
		"tenants": {json: `{"scheduler": {"tenants": [
			{"name": "interactive", "weight": 3, "default_urgency": 1},
			{"name": "batch", "default_urgency": 6, "urgency_ceiling": 4, "max_queue": 32}]}}`},
		"bad tenants": {
			json: `{"scheduler": {"tenants": [{"weight": -1}, {"name": "x", "default_urgency": 8}, {"name": "x", "default_urgency": 2, "urgency_ceiling": 3, "max_queue": -1}]}}`,
			want: []string{"scheduler.tenants[0].name", "scheduler.tenants[0].weight", "scheduler.tenants[1].default_urgency", "scheduler.tenants[2].name", "scheduler.tenants[2].urgency_ceiling", "scheduler.tenants[2].max_queue"},
		},
		"windows beyond the ack delay": {
			json: `{"gateway": {"coalesce": {"window": "30ms", "bulk_window": "40ms"}}}`,
			want: []string{"gateway.coalesce.window", "gateway.coalesce.bulk_window"},
		},
		"deadline beyond its ceiling": {json: `{"gateway": {"deadline": "10m"}}`, want: []string{"gateway.deadline"}},
		"reserve takes every slot":    {json: `{"workers": {"slots": 2}, "scheduler": {"urgent_reserve": 2}}`, want: []string{"scheduler.urgent_reserve"}},
		"bulk_min not above urgent":   {json: `{"gateway": {"coalesce": {"urgent_max": 4, "bulk_min": 3}}}`, want: []string{"gateway.coalesce.bulk_min"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "c.json")
			if err := os.WriteFile(path, []byte(tc.json), 0o600); err != nil {
				t.Fatal(err)
			}
			c, err := loadConfig(path)
			if err != nil {
				t.Fatal(err)
			}
			err = c.withDefaults().validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("valid config refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("invalid config accepted")
			}
			for _, key := range tc.want {
				if !strings.Contains(err.Error(), key+":") {
					t.Errorf("error does not name %s:\n%v", key, err)
				}
			}
		})
	}
}

func TestProviderConfig(t *testing.T) {
	model := t.TempDir()
	if err := os.WriteFile(filepath.Join(model, "model.onnx"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := map[string]struct {
		json    string
		want    []string // keys the errors must name; none: valid
		workers int      // the default worker count it gets, when valid
	}{
		"cpu":           {json: `{"models": [{"name": "a", "dir": %q}]}`, workers: 2},
		"cuda":          {json: `{"models": [{"name": "a", "dir": %q, "provider": "cuda", "device_id": 1, "device_kv": false}], "workers": {"gpu_memory_bytes": 8589934592}}`, workers: 1},
		"auto":          {json: `{"models": [{"name": "a", "dir": %q, "provider": "auto"}]}`, workers: 1},
		"tensorrt":      {json: `{"models": [{"name": "a", "dir": %q, "provider": "tensorrt"}]}`, workers: 1},
		"count stays":   {json: `{"models": [{"name": "a", "dir": %q, "provider": "cuda"}], "workers": {"count": 3}}`, workers: 3},
		"bad provider":  {json: `{"models": [{"name": "a", "dir": %q, "provider": "rocm", "device_id": -1}], "workers": {"gpu_memory_bytes": -1}}`, want: []string{"models[0].provider", "models[0].device_id", "workers.gpu_memory_bytes"}},
		"device on cpu": {json: `{"models": [{"name": "a", "dir": %q, "device_id": 2}]}`, want: []string{"models[0].device_id"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "c.json")
			if err := os.WriteFile(path, []byte(fmt.Sprintf(tc.json, model)), 0o600); err != nil {
				t.Fatal(err)
			}
			c, err := loadConfig(path)
			if err != nil {
				t.Fatal(err)
			}
			c = c.withDefaults()
			err = c.validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("valid config refused: %v", err)
				}
				if c.Workers.Count != tc.workers {
					t.Errorf("workers.count: got %d, want %d", c.Workers.Count, tc.workers)
				}
				return
			}
			if err == nil {
				t.Fatal("invalid config accepted")
			}
			for _, key := range tc.want {
				if !strings.Contains(err.Error(), key+":") {
					t.Errorf("error does not name %s:\n%v", key, err)
				}
			}
		})
	}
}
