package workerpool

import (
	"encoding/json"
	"testing"
	"time"
)

// TestProcessStatusJSON: /debug/state shows a process's status with the
// keys operators read, the heartbeat's stall in seconds.
func TestProcessStatusJSON(t *testing.T) {
	b, err := json.Marshal([]ProcessStatus{{ID: 1, PID: 42, State: "ready", Slots: 4, Restarts: 2, LastExit: "signal: killed", HeartbeatStalled: 1500 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	want := `[{"id":1,"pid":42,"state":"ready","slots":4,"restarts":2,"last_exit":"signal: killed","heartbeat_stalled_seconds":1.5}]`
	if string(b) != want {
		t.Errorf("got %s, want %s", b, want)
	}
}
