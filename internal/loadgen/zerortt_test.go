//go:build !race

package loadgen

import "testing"

// TestRunZeroRTTAgainstBareServer resumes a new connection per request.
// With h3 the client opens streams in 0-RTT in this process; see the note
// in gateway/zerortt_test.go on why this runs without the race detector.
func TestRunZeroRTTAgainstBareServer(t *testing.T) {
	runAgainstBareServer(t, map[string]Config{
		"h3 new conn 0rt": {Proto: ProtoH3, NewConnection: true, ZeroRTT: true, Requests: 6},
		"h2 new conn 0rt": {Proto: ProtoH2, NewConnection: true, ZeroRTT: true, Requests: 6},
	})
}
