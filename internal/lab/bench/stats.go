package bench

import (
	"fmt"
	"math"
	"slices"
)

// Sample is one measured run of one workload under one backend.
type Sample struct {
	Rep       int              `json:"rep"`
	Ops       int64            `json:"ops"`             // connections, exchanges or streams
	Bytes     int64            `json:"bytes,omitempty"` // bulk
	ElapsedS  float64          `json:"elapsed_s"`
	Rate      float64          `json:"rate"` // conn/s, req/s, or (bulk) Gbit/s
	LatP50US  float64          `json:"lat_p50_us"`
	LatP99US  float64          `json:"lat_p99_us"`
	LatP999US float64          `json:"lat_p999_us"`
	LatMaxUS  float64          `json:"lat_max_us"`
	Errors    map[string]int64 `json:"errors,omitempty"`
	Failed    int64            `json:"failed"` // operations that failed (sum of Errors)
	Slow      int64            `json:"slow"`   // connections that took over a second
	CPU       CPUSample        `json:"cpu"`
	// CPUPerUnit is CPU seconds per 1000 connections (conn), per 1000 exchanges (rr)
	// or per GB (bulk), from CPU.TotalS.
	CPUPerUnit float64    `json:"cpu_per_unit"`
	Proxy      ProxyStats `json:"proxy"`    // what the proxy saw in this run
	Captured   float64    `json:"captured"` // share of the proxy's connections that had an original destination
	Conntrack  ctStats    `json:"conntrack"`
	// TCP counters of the pod's and R's namespaces that moved during the run
	// (SYN retransmissions, listen overflows, resets...).
	TCP map[string]int64    `json:"tcp,omitempty"`
	BPF map[string]ProgStat `json:"bpf,omitempty"`
}

// CPUSample is the CPU a run cost, in seconds.
type CPUSample struct {
	// TotalS is every process of the backend's pod (generator, proxy, servers: their
	// cgroups, softirq in their context included) plus the ksoftirqd threads.
	TotalS     float64 `json:"total_s"`
	PodS       float64 `json:"pod_s"`   // the pod's cgroup (outbound generator, inbound server)
	ProxyS     float64 `json:"proxy_s"` // the proxy's cgroup
	PeerS      float64 `json:"peer_s"`  // R's cgroup (outbound server, inbound generator)
	KsoftirqdS float64 `json:"ksoftirqd_s"`
	// The generator's worker threads alone, and their user-space part.
	GenS     float64 `json:"gen_s"`
	GenUserS float64 `json:"gen_user_s"`
	// Machine-wide, from /proc/stat (everyone's; a cross-check).
	MachineBusyS    float64 `json:"machine_busy_s"`
	MachineSoftirqS float64 `json:"machine_softirq_s"`
}

// ProgStat is one eBPF program's activity (bpf_prog_info run_cnt, run_time_ns).
type ProgStat struct {
	RunCnt    uint64  `json:"run_cnt"`
	RunTimeNS uint64  `json:"run_time_ns"`
	NSPerRun  float64 `json:"ns_per_run"`
	RunsPerOp float64 `json:"runs_per_op"`
	NSPerOp   float64 `json:"ns_per_op"`
}

// metric is one number the report compares across backends.
type metric struct {
	Key    string
	Label  string
	Higher bool // higher is better
	Ratio  bool // compare the backends as ratios
	get    func(*Sample) float64
}

var (
	mConnRate = metric{"rate", "conn/s", true, true, func(s *Sample) float64 { return s.Rate }}
	mReqRate  = metric{"rate", "req/s", true, true, func(s *Sample) float64 { return s.Rate }}
	mGbps     = metric{"rate", "Gbit/s", true, true, func(s *Sample) float64 { return s.Rate }}
	mCPUConn  = metric{"cpu_per_unit", "CPU s/1k conn", false, true, func(s *Sample) float64 { return s.CPUPerUnit }}
	mCPUReq   = metric{"cpu_per_unit", "CPU s/1k req", false, true, func(s *Sample) float64 { return s.CPUPerUnit }}
	mCPUGB    = metric{"cpu_per_unit", "CPU s/GB", false, true, func(s *Sample) float64 { return s.CPUPerUnit }}
	mP50      = metric{"lat_p50_us", "p50 µs", false, true, func(s *Sample) float64 { return s.LatP50US }}
	mP99      = metric{"lat_p99_us", "p99 µs", false, true, func(s *Sample) float64 { return s.LatP99US }}
	mP999     = metric{"lat_p999_us", "p99.9 µs", false, true, func(s *Sample) float64 { return s.LatP999US }}
	mConnP99  = metric{"lat_p99_us", "conn p99 µs", false, false, func(s *Sample) float64 { return s.LatP99US }}
	mFailed   = metric{"failed", "failed conns", false, false, func(s *Sample) float64 { return float64(s.Failed) }}
	mSlow     = metric{"slow", "conns > 1 s", false, false, func(s *Sample) float64 { return float64(s.Slow) }}
	mCtDrop   = metric{"ct_drop", "conntrack drops", false, false, func(s *Sample) float64 { return float64(s.Conntrack.Drop) }}
)

func metricsFor(w workload) []metric {
	switch {
	case w.Pressure:
		return []metric{mConnRate, mFailed, mSlow, mConnP99, mCtDrop}
	case w.Kind == KindConn:
		return []metric{mConnRate, mCPUConn, mConnP99}
	case w.Kind == KindRR:
		return []metric{mP50, mP99, mP999, mReqRate, mCPUReq}
	default:
		return []metric{mGbps, mCPUGB}
	}
}

// Summary is the median and range of a metric over the repetitions.
type Summary struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	N      int     `json:"n"`
}

func summarize(v []float64) Summary {
	v = finite(v)
	if len(v) == 0 {
		return Summary{}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return Summary{Median: median(s), Min: s[0], Max: s[len(s)-1], N: len(s)}
}

func finite(v []float64) []float64 {
	out := v[:0:0]
	for _, x := range v {
		if !math.IsNaN(x) && !math.IsInf(x, 0) {
			out = append(out, x)
		}
	}
	return out
}

// median of a sorted slice.
func median(s []float64) float64 {
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// Ratio compares a metric of eBPF with another backend, repetition by repetition
// (runs of one repetition are adjacent in time, so drift of the machine cancels).
type Ratio struct {
	Metric string  `json:"metric"`
	Label  string  `json:"label"`
	Over   string  `json:"over"` // ebpf / Over
	Higher bool    `json:"higher_is_better"`
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	Spread float64 `json:"spread"` // Max - Min
	N      int     `json:"n"`
	// Shown is false when the spread is larger than the difference from 1: the
	// ratio is then noise and the report refuses to print it.
	Shown bool `json:"shown"`
}

func pairedRatio(m metric, over string, num, den []Sample) (Ratio, bool) {
	byRep := map[int]float64{}
	for i := range den {
		byRep[den[i].Rep] = m.get(&den[i])
	}
	var rs []float64
	for i := range num {
		d, ok := byRep[num[i].Rep]
		if !ok || d == 0 {
			continue
		}
		rs = append(rs, m.get(&num[i])/d)
	}
	s := summarize(rs)
	if s.N == 0 {
		return Ratio{}, false
	}
	r := Ratio{Metric: m.Key, Label: m.Label, Over: over, Higher: m.Higher,
		Median: s.Median, Min: s.Min, Max: s.Max, Spread: s.Max - s.Min, N: s.N}
	r.Shown = r.Spread <= math.Abs(r.Median-1)
	return r, true
}

// String prints the ratio, or why it is withheld.
func (r Ratio) String() string {
	if !r.Shown {
		return fmt.Sprintf("~1 (noise ±%.2f)", r.Spread/2)
	}
	return fmt.Sprintf("%.2f× ±%.2f", r.Median, r.Spread/2)
}

// Target is one of the goals, checked against the measured ratio.
type Target struct {
	Goal      string  `json:"goal"`
	Workload  string  `json:"workload"`
	Metric    string  `json:"metric"`
	Over      string  `json:"over"`
	Op        string  `json:"op"` // ">=", "<=" or "<"
	Threshold float64 `json:"threshold"`
	Ratio     float64 `json:"ratio"`
	Min       float64 `json:"min"`
	Max       float64 `json:"max"`
	// Status: "met", "missed" or "no data". Clear is false when the range of the
	// repetitions' ratios straddles the threshold.
	Status string `json:"status"`
	Clear  bool   `json:"clear"`
	Detail string `json:"detail"`
}

type targetDef struct {
	goal, metric, over, op string
	threshold              float64
	workloads              []string
}

var targetDefs = []targetDef{
	{"connection rate: eBPF ≥ 1.2 × iptables", "rate", Iptables, ">=", 1.2, []string{"conn-out", "conn-in"}},
	{"connection rate: eBPF ≥ 0.95 × none", "rate", None, ">=", 0.95, []string{"conn-out", "conn-in"}},
	{"request/response p99: eBPF no worse than iptables", "lat_p99_us", Iptables, "<=", 1.0, []string{"rr-out", "rr-in"}},
	{"request/response p99: eBPF within 5 % of none", "lat_p99_us", None, "<=", 1.05, []string{"rr-out", "rr-in"}},
	{"CPU per 1000 connections: eBPF below iptables", "cpu_per_unit", Iptables, "<", 1.0, []string{"conn-out", "conn-in"}},
}

func satisfies(op string, v, t float64) bool {
	switch op {
	case ">=":
		return v >= t
	case "<=":
		return v <= t
	default:
		return v < t
	}
}

func evalTargets(ws []*WorkloadResult) []Target {
	var out []Target
	for _, d := range targetDefs {
		for _, name := range d.workloads {
			t := Target{Goal: d.goal, Workload: name, Metric: d.metric, Over: d.over, Op: d.op, Threshold: d.threshold, Status: "no data"}
			var r *Ratio
			for _, w := range ws {
				if w.Name != name {
					continue
				}
				for i := range w.Ratios {
					if w.Ratios[i].Metric == d.metric && w.Ratios[i].Over == d.over {
						r = &w.Ratios[i]
					}
				}
			}
			if r == nil {
				t.Detail = "workload not run"
				out = append(out, t)
				continue
			}
			t.Ratio, t.Min, t.Max = r.Median, r.Min, r.Max
			t.Clear = satisfies(d.op, r.Min, d.threshold) == satisfies(d.op, r.Max, d.threshold)
			if satisfies(d.op, r.Median, d.threshold) {
				t.Status = "met"
				t.Detail = fmt.Sprintf("%.2f× (want %s %.2f×)", r.Median, d.op, d.threshold)
			} else {
				t.Status = "missed"
				t.Detail = fmt.Sprintf("%.3f× (want %s %.2f×): missed by %.1f %%", r.Median, d.op, d.threshold,
					math.Max(0.1, 100*math.Abs(r.Median-d.threshold)/d.threshold))
			}
			if !t.Clear {
				t.Detail += fmt.Sprintf("; not clear-cut: the repetitions range over %.2f–%.2f×", r.Min, r.Max)
			}
			out = append(out, t)
		}
	}
	return out
}
