package bench

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// tcpCounters are the TCP counters that explain a stall (a lost SYN costs a second):
// read from /proc/PID/net/{snmp,netstat} of a process in each namespace.
var tcpCounters = []string{
	"TcpExt:ListenOverflows", "TcpExt:ListenDrops", "TcpExt:TCPSynRetrans", "TcpExt:TCPTimeouts",
	"TcpExt:TCPChallengeACK", "TcpExt:TWRecycled", "Tcp:AttemptFails", "Tcp:EstabResets",
	"Tcp:RetransSegs", "Tcp:OutRsts",
}

// readTCPCounters returns the counters of the namespace of pid, named "Tcp:X".
func readTCPCounters(pid int) map[string]int64 {
	out := map[string]int64{}
	for _, f := range []string{"snmp", "netstat"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, f))
		if err != nil {
			continue
		}
		lines := strings.Split(string(b), "\n")
		// Pairs of lines: "Prefix: names..." then "Prefix: values...".
		for i := 0; i+1 < len(lines); i += 2 {
			names, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
			if len(names) == 0 || len(names) != len(vals) || names[0] != vals[0] {
				continue
			}
			prefix := names[0]
			for j := 1; j < len(names); j++ {
				key := prefix + names[j]
				for _, want := range tcpCounters {
					if key == want {
						v, _ := strconv.ParseInt(vals[j], 10, 64)
						out[key] = v
					}
				}
			}
		}
	}
	return out
}

// tcpDelta is after - before, summed over the namespaces, zeros left out.
func tcpDelta(before, after []map[string]int64) map[string]int64 {
	d := map[string]int64{}
	for i := range after {
		for k, v := range after[i] {
			if i < len(before) {
				v -= before[i][k]
			}
			if v != 0 {
				d[k] += v
			}
		}
	}
	return d
}
