package loadgen

import (
	"os"
	"strings"
	"testing"
)

func TestReadRSS(t *testing.T) {
	// This process holds a buffer it has touched: its resident set is at
	// least that.
	buf := make([]byte, 8<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	rss, err := ReadRSS(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if rss < int64(len(buf)) {
		t.Errorf("ReadRSS = %d bytes, want at least the %d touched", rss, len(buf))
	}
	if buf[len(buf)-1] != byte(len(buf)-1) {
		t.Fatal("buffer changed")
	}
	if _, err := ReadRSS(-1); err == nil {
		t.Error("ReadRSS(-1) succeeded")
	}
}

func TestMemoryConfigValidate(t *testing.T) {
	err := MemoryConfig{URL: "http://x", Conns: []int{10, 5}, Streams: -1}.Validate()
	for _, want := range []string{"url:", "mem-pid:", "mem-conns:", "mem-streams:"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v, want it to name %s", err, want)
		}
	}
	if err := (MemoryConfig{URL: "https://127.0.0.1:1", PID: 1, Conns: []int{1, 2}}).Validate(); err != nil {
		t.Errorf("Validate() of a good config = %v", err)
	}
}
