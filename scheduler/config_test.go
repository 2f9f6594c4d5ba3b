package scheduler

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"h3infer/config"
	"h3infer/priority"
)

// TestConfigFromFile: the scheduler section decodes into Config, a key
// left out means its default, and a tenant's default_urgency written as 0
// is 0 while one left out is RFC 9218's default.
func TestConfigFromFile(t *testing.T) {
	var c Config
	err := json.Unmarshal([]byte(`{"max_queue": 5, "retry_after": "3s", "urgent_reserve": 0, "tenants": [
		{"name": "a"},
		{"name": "b", "weight": 0, "default_urgency": 0, "max_queue": 2},
		{"name": "c", "weight": 4, "default_urgency": 6, "urgency_ceiling": 4}]}`), &c)
	if err != nil {
		t.Fatal(err)
	}
	c = c.WithDefaults()
	if c.MaxQueue != 5 || time.Duration(c.RetryAfter) != 3*time.Second || time.Duration(c.Aging) != DefaultAging || *c.UrgentReserve != 0 {
		t.Errorf("got max_queue %d, retry_after %s, aging %s, urgent_reserve %d; want 5, 3s, %s, 0",
			c.MaxQueue, c.RetryAfter, c.Aging, *c.UrgentReserve, DefaultAging)
	}
	want := []Tenant{
		{Name: "a", Weight: 1, DefaultUrgency: priority.Default},
		{Name: "b", Weight: 1, DefaultUrgency: 0, MaxQueue: 2},
		{Name: "c", Weight: 4, DefaultUrgency: 6, UrgencyCeiling: 4},
	}
	if len(c.Tenants) != len(want) {
		t.Fatalf("tenants %+v, want %+v", c.Tenants, want)
	}
	for i := range want {
		if c.Tenants[i] != want[i] {
			t.Errorf("tenants[%d] = %+v, want %+v", i, c.Tenants[i], want[i])
		}
	}
	if err := c.Validate(); err != nil {
		t.Errorf("valid config refused: %v", err)
	}
	if err := json.Unmarshal([]byte(`{"tenants": [{"name": "a", "share": 2}]}`), &c); err == nil || !strings.Contains(err.Error(), "share") {
		t.Errorf("unknown tenant key: err %v, want one naming it", err)
	}
}

func TestConfigDefaults(t *testing.T) {
	c := Config{}.WithDefaults()
	if c.MaxQueue != DefaultMaxQueue || time.Duration(c.RetryAfter) != DefaultRetryAfter || time.Duration(c.Aging) != DefaultAging ||
		c.Classes != priority.DefaultClasses || *c.UrgentReserve != DefaultUrgentReserve {
		t.Errorf("defaults %+v", c)
	}
	if c.Admission != AdmissionDelay || time.Duration(c.MaxQueueDelay) != DefaultMaxQueueDelay ||
		c.QueueDelayTarget != c.MaxQueueDelay*3/2 || time.Duration(c.QueueDelayInterval) != DefaultQueueDelayInterval {
		t.Errorf("admission defaults %+v", c)
	}
	// The guard's target follows max_queue_delay unless set.
	if c := (Config{MaxQueueDelay: config.Duration(3 * time.Second)}).WithDefaults(); c.QueueDelayTarget != c.MaxQueueDelay*3/2 {
		t.Errorf("queue_delay_target %s, want 1.5 max_queue_delay %s", c.QueueDelayTarget, c.MaxQueueDelay)
	}
}

// TestConfigValidate: every problem at once, each naming its key.
func TestConfigValidate(t *testing.T) {
	err := Config{
		MaxQueue: -1, Aging: -1, UrgentReserve: new(-1),
		Admission: "lifo", LIFO: true, MaxQueueDelay: -1, QueueDelayTarget: -1, QueueDelayInterval: -1,
		Classes: priority.Classes{UrgentMax: 3, BulkMin: 3},
		Tenants: []Tenant{{Name: "a", Weight: MaxWeight + 1, DefaultUrgency: 2, UrgencyCeiling: 8}},
	}.Validate()
	for _, key := range []string{"scheduler.max_queue:", "scheduler.admission:", "scheduler.lifo:", "scheduler.max_queue_delay:",
		"scheduler.queue_delay_target:", "scheduler.queue_delay_interval:", "scheduler.aging:", "scheduler.urgent_reserve:", "priority.bulk_min:",
		"scheduler.tenants[0].weight:", "scheduler.tenants[0].urgency_ceiling:"} {
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("error %v does not name %s", err, key)
		}
	}
}
