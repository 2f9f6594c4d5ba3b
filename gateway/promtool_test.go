package gateway

import (
	"bufio"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// promtoolCheck runs `promtool check metrics` (Debian package prometheus,
// installed by .ci/run) on a real scrape: it fails on names and help text
// that break Prometheus conventions.
func promtoolCheck(t *testing.T, exposition string) {
	t.Helper()
	bin, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not found (apt-get install prometheus): %v", err)
	}
	cmd := exec.Command(bin, "check", "metrics")
	cmd.Stdin = strings.NewReader(exposition)
	out, err := cmd.CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// sampleValue returns the value of the sample line that starts with name
// followed by a space or "{", summing over label sets.
func sampleValue(t *testing.T, exposition, name string) float64 {
	t.Helper()
	sum, found := 0.0, false
	sc := bufio.NewScanner(strings.NewReader(exposition))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		if !strings.HasPrefix(rest, " ") && !strings.HasPrefix(rest, "{") {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			t.Fatalf("sample %q: %v", line, err)
		}
		sum += v
		found = true
	}
	if !found {
		t.Errorf("no sample named %s", name)
	}
	return sum
}
