package loadgen

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTick is the unit of the CPU times in /proc/PID/stat: USER_HZ,
// which Linux fixes at 100 on every architecture this project builds for.
const clockTick = 10 * time.Millisecond

// ProcessCPU is the CPU time, user and system, that pid, the children it
// has reaped and the children it still runs (recursively) have used, read
// from /proc. For a gateway that is the gateway and its worker processes,
// restarted ones included. The resolution is one clock tick (10 ms), so a
// caller measures over seconds.
func ProcessCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("cpu of %d: %w", pid, err)
	}
	// The command name in parentheses may hold spaces; the fields after
	// it are numbers.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("cpu of %d: malformed /proc/%d/stat", pid, pid)
	}
	f := strings.Fields(s[i+1:])
	// After the name: state is field 3 of stat(5), so utime (14), stime
	// (15), cutime (16) and cstime (17) are f[11] to f[14].
	if len(f) < 15 {
		return 0, fmt.Errorf("cpu of %d: short /proc/%d/stat", pid, pid)
	}
	var ticks int64
	for _, v := range f[11:15] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("cpu of %d: %w", pid, err)
		}
		ticks += n
	}
	total := time.Duration(ticks) * clockTick
	for _, child := range childPIDs(pid) {
		if c, err := ProcessCPU(child); err == nil { // a child may exit meanwhile
			total += c
		}
	}
	return total, nil
}

// childPIDs lists pid's live child processes, from every thread's
// children file.
func childPIDs(pid int) []int {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	var out []int
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, t.Name()))
		if err != nil {
			continue
		}
		for _, w := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(w); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}
