package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// cgroupUsage reads usage_usec from a cgroup v2 cpu.stat. Without
// CONFIG_IRQ_TIME_ACCOUNTING (the usual configuration) a task's time includes the
// softirq work done in its context, which on veth and lo is most of the network
// stack's receive path.
func cgroupUsage(dir string) (time.Duration, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return time.Duration(n) * time.Microsecond, err
		}
	}
	return 0, fmt.Errorf("%s/cpu.stat: no usage_usec", dir)
}

// ksoftirqdTime is the CPU time of the ksoftirqd threads (softirq work deferred out
// of the tasks' context), from /proc/PID/schedstat (ns).
func ksoftirqdTime() time.Duration {
	var total time.Duration
	for _, pid := range ksoftirqdPids() {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/schedstat", pid))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) > 0 {
			if n, err := strconv.ParseInt(f[0], 10, 64); err == nil {
				total += time.Duration(n)
			}
		}
	}
	return total
}

var ksoftirqd []int

func ksoftirqdPids() []int {
	if ksoftirqd != nil {
		return ksoftirqd
	}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err == nil && strings.HasPrefix(string(comm), "ksoftirqd/") {
			ksoftirqd = append(ksoftirqd, pid)
		}
	}
	if ksoftirqd == nil {
		ksoftirqd = []int{}
	}
	return ksoftirqd
}

// procStat is the machine-wide busy and softirq time from /proc/stat (tick-sampled,
// everyone's: a cross-check, noisy on a shared machine).
type procStat struct{ busy, softirq time.Duration }

func readProcStat() procStat {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return procStat{}
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return procStat{}
	}
	fields := strings.Fields(sc.Text()) // cpu user nice system idle iowait irq softirq steal ...
	if len(fields) < 8 || fields[0] != "cpu" {
		return procStat{}
	}
	tick := time.Second / 100 // USER_HZ
	var v [8]int64
	for i := 1; i < 8 && i < len(fields); i++ {
		v[i], _ = strconv.ParseInt(fields[i], 10, 64)
	}
	busy := v[1] + v[2] + v[3] + v[6] + v[7]
	return procStat{busy: time.Duration(busy) * tick, softirq: time.Duration(v[7]) * tick}
}

// Meta describes the machine and the run.
type Meta struct {
	Kernel  string `json:"kernel"`
	Arch    string `json:"arch"`
	CPU     string `json:"cpu"`
	CPUs    int    `json:"cpus"`
	Date    string `json:"date"`
	Go      string `json:"go"`
	Command string `json:"command"`
}

func readMeta() Meta {
	m := Meta{Arch: runtime.GOARCH, CPUs: runtime.NumCPU(), Date: time.Now().UTC().Format(time.RFC3339), Go: runtime.Version()}
	var u unix.Utsname
	if err := unix.Uname(&u); err == nil {
		m.Kernel = strings.Join([]string{unix.ByteSliceToString(u.Sysname[:]), unix.ByteSliceToString(u.Release[:]), unix.ByteSliceToString(u.Version[:])}, " ")
		m.Arch = unix.ByteSliceToString(u.Machine[:])
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range bytes.Split(b, []byte("\n")) {
			k, v, ok := bytes.Cut(line, []byte(":"))
			if ok && string(bytes.TrimSpace(k)) == "model name" {
				m.CPU = string(bytes.TrimSpace(v))
				break
			}
		}
	}
	if m.CPU == "" {
		m.CPU = "unknown"
	}
	m.Command = strings.Join(os.Args, " ")
	return m
}
