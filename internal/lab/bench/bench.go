// Package bench is `ebpf-redirect bench`: the kernel-level benchmark of the capture.
// It builds one throwaway pod per backend (internal/topology) — none (the client
// connects to the proxy's listener itself), iptables (the reference ruleset) and ebpf
// (ebpf-redirect attach, as a node agent runs it) — with the same generator, the same
// proxy and the same servers in each, and runs every workload under the three
// backends in turn (none, iptables, ebpf, none, iptables, ebpf, ...), several times.
// It reports medians and spreads, ratios only where the spread is smaller than the
// difference, the goals of the issue met or missed, and the eBPF programs' own
// run counts and run times.
//
// The agents are the bench binary re-executed (standin.Start) in the role "bench":
// the generator (client.go), a lean proxy (proxy.go) and servers (server.go).
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/equiv"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/privtest"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
)

// Directions of a workload.
const (
	dirOut    = "out"    // a client in the pod connects to a server on R
	dirIn     = "in"     // a client on R connects to the pod's application
	dirDirect = "direct" // calibration: the pod's client straight to R's server, no proxy
)

type workload struct {
	Name        string
	Kind        string
	Dir         string
	Pressure    bool
	Description string
	V6          bool // over IPv6 (the pods are dual-stack, both rulesets apply)
}

var workloads = []workload{
	{"conn-out", KindConn, dirOut, false, "short connections pod → R: connect, one request/response, close", false},
	{"conn-in", KindConn, dirIn, false, "short connections R → pod application (through 15006)", false},
	{"rr-out", KindRR, dirOut, false, "request/response latency on persistent connections pod → R", false},
	{"rr-in", KindRR, dirIn, false, "request/response latency on persistent connections R → pod", false},
	{"bulk-out", KindBulk, dirOut, false, "bulk throughput pod → R through a redirected connection", false},
	{"bulk-in", KindBulk, dirIn, false, "bulk throughput R → pod through a redirected connection", false},
	{"conn-out6", KindConn, dirOut, false, "conn-out over IPv6", true},
	{"conn-in6", KindConn, dirIn, false, "conn-in over IPv6", true},
	{"rr-out6", KindRR, dirOut, false, "rr-out over IPv6", true},
	{"rr-in6", KindRR, dirIn, false, "rr-in over IPv6", true},
	{"conntrack-out", KindConn, dirOut, true, "conn-out with a small nf_conntrack_max: the table fills", false},
}

// WorkloadNames lists the workloads in the order they run.
func WorkloadNames() []string {
	var n []string
	for _, w := range workloads {
		n = append(n, w.Name)
	}
	return n
}

// Options configure a bench run. Zero values take the defaults (Quick selects the
// short ones).
type Options struct {
	Binary       string // the ebpf-redirect CLI for attach/detach (required)
	AgentExe     string // re-executed for the agents; default: this executable
	ReferenceDir string // inpod-rules.v4 and inpod-routes.sh; "": the embedded copy

	Quick bool
	Reps  int

	ConnDuration     time.Duration
	RRDuration       time.Duration
	BulkDuration     time.Duration
	PressureDuration time.Duration
	Warmup           time.Duration

	ConnWorkers int
	RRWorkers   int
	BulkWorkers int
	MsgSize     int // bytes each way per exchange (conn, rr)
	BulkWrite   int // bytes per write (bulk)
	Timeout     time.Duration

	ConntrackMax int      // nf_conntrack_max during conntrack-out
	Workloads    []string // subset to run; default all
	NoPin        bool     // do not pin the generator's threads
	NoBPFStats   bool     // do not enable BPF run-time statistics for the ebpf runs

	Progress io.Writer // progress lines; nil: none
}

func (o *Options) defaults() error {
	def := func(d *time.Duration, full, quick time.Duration) {
		if *d == 0 {
			*d = full
			if o.Quick {
				*d = quick
			}
		}
	}
	defInt := func(v *int, full, quick int) {
		if *v == 0 {
			*v = full
			if o.Quick {
				*v = quick
			}
		}
	}
	defInt(&o.Reps, 5, 3)
	def(&o.ConnDuration, 3*time.Second, 300*time.Millisecond)
	def(&o.RRDuration, 3*time.Second, 300*time.Millisecond)
	def(&o.BulkDuration, 2*time.Second, 300*time.Millisecond)
	def(&o.PressureDuration, 3*time.Second, 600*time.Millisecond)
	def(&o.Warmup, 500*time.Millisecond, 100*time.Millisecond)
	def(&o.Timeout, 3*time.Second, 1500*time.Millisecond)
	defInt(&o.ConnWorkers, 8, 8)
	defInt(&o.RRWorkers, 1, 1)
	defInt(&o.BulkWorkers, 1, 1)
	defInt(&o.MsgSize, 100, 100)
	defInt(&o.BulkWrite, 128<<10, 128<<10)
	defInt(&o.ConntrackMax, 2048, 2048)
	if o.Reps < 2 {
		return errors.New("at least 2 repetitions are needed for a spread")
	}
	for _, n := range o.Workloads {
		if !slices.Contains(WorkloadNames(), n) {
			return fmt.Errorf("no workload %q (have %v)", n, WorkloadNames())
		}
	}
	return nil
}

func (o *Options) selected() []workload {
	var out []workload
	for _, w := range workloads {
		if len(o.Workloads) == 0 || slices.Contains(o.Workloads, w.Name) {
			out = append(out, w)
		}
	}
	return out
}

// Report is everything a run measured; it is what --json prints.
type Report struct {
	Meta      Meta              `json:"meta"`
	Settings  Settings          `json:"settings"`
	Workloads []*WorkloadResult `json:"workloads"`
	Generator *GeneratorCheck   `json:"generator,omitempty"`
	Targets   []Target          `json:"targets"`
	Notes     []string          `json:"notes,omitempty"`
}

// Settings are the options a report was made with.
type Settings struct {
	Quick            bool    `json:"quick"`
	Reps             int     `json:"reps"`
	ConnDurationS    float64 `json:"conn_duration_s"`
	RRDurationS      float64 `json:"rr_duration_s"`
	BulkDurationS    float64 `json:"bulk_duration_s"`
	PressureDuration float64 `json:"pressure_duration_s"`
	ConnWorkers      int     `json:"conn_workers"`
	RRWorkers        int     `json:"rr_workers"`
	BulkWorkers      int     `json:"bulk_workers"`
	MsgSize          int     `json:"msg_size"`
	BulkWrite        int     `json:"bulk_write"`
	ConntrackMax     int     `json:"conntrack_max"`
	Pinned           bool    `json:"pinned"`
	BPFStats         bool    `json:"bpf_stats"`
}

// WorkloadResult is one workload under every backend.
type WorkloadResult struct {
	Name        string           `json:"name"`
	Kind        string           `json:"kind"`
	Direction   string           `json:"direction"`
	Description string           `json:"description"`
	Backends    []*BackendResult `json:"backends"`
	Ratios      []Ratio          `json:"ratios"`
	// BPF is the ebpf backend's programs over all repetitions.
	BPF map[string]ProgStat `json:"bpf,omitempty"`

	w workload
}

// BackendResult is one workload under one backend.
type BackendResult struct {
	Backend string             `json:"backend"`
	Samples []Sample           `json:"samples"`
	Summary map[string]Summary `json:"summary"`
}

func (w *WorkloadResult) backend(name string) *BackendResult {
	for _, b := range w.Backends {
		if b.Backend == name {
			return b
		}
	}
	return nil
}

// GeneratorCheck shows that the generator is not what limits the rate: the same
// generator straight to the server (no proxy, no capture), and its own CPU.
type GeneratorCheck struct {
	Workers int `json:"workers"`
	// DirectRate: conn/s with the client connecting straight to R's server.
	DirectRate Summary `json:"direct_rate"`
	// NoneRate: conn-out under none (through the proxy).
	NoneRate Summary `json:"none_rate"`
	// At none's conn-out rate: CPU cores busy in the generator's threads (all, and
	// user space only), and in everything of the pod.
	GenCores     Summary  `json:"gen_cores"`
	GenUserCores Summary  `json:"gen_user_cores"`
	TotalCores   Summary  `json:"total_cores"`
	GenUserUSOp  Summary  `json:"gen_user_us_per_conn"`
	Samples      []Sample `json:"samples"`
}

// Run builds the pods, runs every selected workload under every backend, and tears
// everything down (also when ctx is cancelled).
func Run(ctx context.Context, o Options) (rep *Report, err error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	if m := privtest.Missing("iptables-restore"); m != "" {
		return nil, fmt.Errorf("bench needs %s", m)
	}
	if o.Binary == "" {
		return nil, errors.New("bench: no ebpf-redirect binary given")
	}
	ipt, err := equiv.NewIptables(o.ReferenceDir)
	if err != nil {
		return nil, err
	}
	b := &bencher{o: o, progress: o.Progress}
	if b.progress == nil {
		b.progress = io.Discard
	}
	rep = &Report{Meta: readMeta(), Settings: Settings{
		Quick: o.Quick, Reps: o.Reps, ConnDurationS: o.ConnDuration.Seconds(), RRDurationS: o.RRDuration.Seconds(),
		BulkDurationS: o.BulkDuration.Seconds(), PressureDuration: o.PressureDuration.Seconds(),
		ConnWorkers: o.ConnWorkers, RRWorkers: o.RRWorkers, BulkWorkers: o.BulkWorkers,
		MsgSize: o.MsgSize, BulkWrite: o.BulkWrite, ConntrackMax: o.ConntrackMax,
		Pinned: !o.NoPin, BPFStats: !o.NoBPFStats,
	}}
	sel := o.selected()

	// nf_conntrack_max is machine-wide: hold it (and restore what a dead bench left)
	// before anything else, release it whatever happens.
	var ct *conntrackMax
	if !slices.ContainsFunc(sel, func(w workload) bool { return w.Pressure }) {
		if err := recoverConntrackMax(); err != nil {
			return nil, err
		}
	} else {
		if ct, err = holdConntrackMax(ctx); err != nil {
			return nil, err
		}
		defer func() {
			if rerr := ct.restore(); rerr != nil {
				err = errors.Join(err, fmt.Errorf("restoring nf_conntrack_max: %w", rerr))
			}
		}()
	}

	run, err := topology.NewRun()
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := run.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	captures := map[string]equiv.Backend{None: nil, Iptables: ipt, Ebpf: &equiv.Ebpf{Binary: o.Binary}}
	pods := map[string]*benchPod{}
	defer func() {
		for _, name := range Backends {
			if bp := pods[name]; bp != nil {
				if cerr := bp.close(); cerr != nil {
					err = errors.Join(err, fmt.Errorf("%s pod: %w", name, cerr))
				}
			}
		}
	}()
	b.logf("bench: %s, %s (%d CPUs), %s", rep.Meta.Kernel, rep.Meta.CPU, rep.Meta.CPUs, rep.Meta.Go)
	for _, name := range Backends {
		bp, err := newBenchPod(ctx, run, name, captures[name], o.AgentExe)
		if err != nil {
			return nil, fmt.Errorf("setting up the %s pod: %w", name, err)
		}
		pods[name] = bp
	}
	b.logf("bench: pods ready (none, iptables, ebpf); warming up")
	for _, name := range Backends {
		for _, dir := range []string{dirOut, dirIn} {
			spec := b.spec(workload{Kind: KindConn, Dir: dir}, pods[name])
			spec.DurationMS = int(o.Warmup.Milliseconds())
			var res RunResult
			if err := call(ctx, pods[name].generator(dir), opRun, spec, &res); err != nil {
				return nil, fmt.Errorf("warm-up %s %s: %w", name, dir, err)
			}
			if res.Ops == 0 {
				return nil, fmt.Errorf("warm-up %s %s: no connection succeeded (%v)", name, dir, res.Errors)
			}
			if err := b.settle(ctx, pods[name]); err != nil {
				return nil, err
			}
		}
	}

	b.total = len(sel) * o.Reps * len(Backends)
	if slices.ContainsFunc(sel, func(w workload) bool { return w.Name == "conn-out" }) {
		b.total += o.Reps
	}
	for _, w := range sel {
		wr := &WorkloadResult{Name: w.Name, Kind: w.Kind, Direction: w.Dir, Description: w.Description, w: w}
		for _, name := range Backends {
			wr.Backends = append(wr.Backends, &BackendResult{Backend: name})
		}
		if w.Pressure {
			if err := ct.set(o.ConntrackMax); err != nil {
				return rep, fmt.Errorf("setting nf_conntrack_max: %w", err)
			}
			b.logf("bench: nf_conntrack_max=%d (machine-wide) for %s", o.ConntrackMax, w.Name)
		}
		for r := 1; r <= o.Reps; r++ {
			for _, name := range Backends {
				s, err := b.measure(ctx, pods[name], w, r)
				if err != nil {
					return rep, fmt.Errorf("%s under %s, repetition %d: %w", w.Name, name, r, err)
				}
				wr.backend(name).Samples = append(wr.backend(name).Samples, s)
			}
			if w.Name == "conn-out" {
				s, err := b.measure(ctx, pods[None], workload{Name: "direct", Kind: KindConn, Dir: dirDirect}, r)
				if err != nil {
					return rep, fmt.Errorf("generator calibration, repetition %d: %w", r, err)
				}
				if rep.Generator == nil {
					rep.Generator = &GeneratorCheck{Workers: o.ConnWorkers}
				}
				rep.Generator.Samples = append(rep.Generator.Samples, s)
			}
		}
		if w.Pressure {
			if err := ct.restore(); err != nil {
				return rep, fmt.Errorf("restoring nf_conntrack_max: %w", err)
			}
			b.logf("bench: nf_conntrack_max restored")
		}
		finishWorkload(wr)
		rep.Workloads = append(rep.Workloads, wr)
		if err := ctx.Err(); err != nil {
			return rep, err
		}
	}
	finishGenerator(rep)
	rep.Targets = evalTargets(rep.Workloads)
	rep.Notes = notes(rep)
	return rep, nil
}

type bencher struct {
	o        Options
	progress io.Writer
	step     int
	total    int
}

func (b *bencher) logf(format string, args ...any) {
	fmt.Fprintf(b.progress, format+"\n", args...)
}

func (b *bencher) spec(w workload, bp *benchPod) RunSpec {
	s := RunSpec{Kind: w.Kind, Target: bp.target(w.Dir, w.V6), Size: b.o.MsgSize,
		TimeoutMS: int(b.o.Timeout.Milliseconds()), Pin: !b.o.NoPin}
	switch w.Kind {
	case KindConn:
		s.Workers, s.DurationMS = b.o.ConnWorkers, int(b.o.ConnDuration.Milliseconds())
		if w.Pressure {
			s.DurationMS = int(b.o.PressureDuration.Milliseconds())
		}
	case KindRR:
		s.Workers, s.DurationMS = b.o.RRWorkers, int(b.o.RRDuration.Milliseconds())
	case KindBulk:
		s.Workers, s.DurationMS, s.Size = b.o.BulkWorkers, int(b.o.BulkDuration.Milliseconds()), b.o.BulkWrite
	}
	return s
}

// snapshot is every counter a run is measured by, read before and after it.
type snapshot struct {
	cg        map[string]time.Duration
	ksoftirqd time.Duration
	machine   procStat
	proxy     ProxyStats
	ct        ctStats
	tcp       []map[string]int64 // pod netns, R's netns
	progs     map[string]*ebpf.ProgramStats
}

func (b *bencher) snapshot(ctx context.Context, bp *benchPod) (snapshot, error) {
	s := snapshot{cg: map[string]time.Duration{}, ksoftirqd: ksoftirqdTime(), machine: readProcStat()}
	for name, dir := range bp.cgroups() {
		u, err := cgroupUsage(dir)
		if err != nil {
			return s, err
		}
		s.cg[name] = u
	}
	var st AgentStats
	if err := call(ctx, bp.proxy, opStats, struct{}{}, &st); err != nil {
		return s, err
	}
	s.proxy = st.Proxy
	s.ct = readCtStats(bp.proxy.Pid)
	s.tcp = []map[string]int64{readTCPCounters(bp.proxy.Pid), readTCPCounters(bp.peer.Pid)}
	if bp.progs != nil {
		s.progs = map[string]*ebpf.ProgramStats{}
		for name, p := range bp.progs {
			ps, err := p.Stats()
			if err != nil {
				return s, fmt.Errorf("stats of program %s: %w", name, err)
			}
			s.progs[name] = ps
		}
	}
	return s, nil
}

// settle waits until no connection is open in the pod's proxy and servers, so that a
// run's closing handshakes are counted in it and not in the next.
func (b *bencher) settle(ctx context.Context, bp *benchPod) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		busy := int64(0)
		for _, a := range []*standin.Agent{bp.proxy, bp.app, bp.peer} {
			var st AgentStats
			if err := call(ctx, a, opStats, struct{}{}, &st); err != nil {
				return err
			}
			busy += st.InFlight
		}
		if busy == 0 || time.Now().After(deadline) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// measure runs one workload once under one backend.
func (b *bencher) measure(ctx context.Context, bp *benchPod, w workload, rep int) (Sample, error) {
	if err := ctx.Err(); err != nil {
		return Sample{}, err
	}
	if bp.backend == Iptables && w.Kind == KindConn {
		if err := flushConntrack(bp.pod.NetNSPath()); err != nil {
			return Sample{}, fmt.Errorf("flushing conntrack: %w", err)
		}
	}
	if bp.progs != nil && !b.o.NoBPFStats {
		stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
		if err != nil {
			return Sample{}, fmt.Errorf("enabling BPF run-time statistics: %w", err)
		}
		defer stats.Close()
	}
	spec := b.spec(w, bp)
	before, err := b.snapshot(ctx, bp)
	if err != nil {
		return Sample{}, err
	}
	var res RunResult
	if err := call(ctx, bp.generator(w.Dir), opRun, spec, &res); err != nil {
		return Sample{}, err
	}
	if err := b.settle(ctx, bp); err != nil {
		return Sample{}, err
	}
	after, err := b.snapshot(ctx, bp)
	if err != nil {
		return Sample{}, err
	}
	s := makeSample(rep, w, &res, before, after)
	if w.Dir != dirDirect {
		b.step++
	}
	b.logf("[%3d/%d] %-13s rep %d/%d %-8s %s", b.step, b.total, w.Name, rep, b.o.Reps, bp.backend, s.brief(w))
	if s.Ops == 0 {
		return s, fmt.Errorf("no operation succeeded (errors: %v)", s.Errors)
	}
	if w.Dir != dirDirect && bp.backend != None && s.Captured < 1 {
		return s, fmt.Errorf("only %.1f %% of the proxy's connections were captured (%+v)", 100*s.Captured, s.Proxy)
	}
	return s, nil
}

func makeSample(rep int, w workload, res *RunResult, before, after snapshot) Sample {
	el := float64(res.ElapsedNS) / 1e9
	s := Sample{Rep: rep, Ops: res.Ops, Bytes: res.Bytes, ElapsedS: el, Errors: res.Errors, Slow: res.Slow,
		LatP50US: float64(res.Lat.P50) / 1e3, LatP99US: float64(res.Lat.P99) / 1e3,
		LatP999US: float64(res.Lat.P999) / 1e3, LatMaxUS: float64(res.Lat.Max) / 1e3}
	for _, n := range res.Errors {
		s.Failed += n
	}
	if el > 0 {
		s.Rate = float64(res.Ops) / el
		if w.Kind == KindBulk {
			s.Rate = float64(res.Bytes) * 8 / el / 1e9
		}
	}
	sec := func(d time.Duration) float64 { return d.Seconds() }
	c := &s.CPU
	c.PodS = sec(after.cg["pod"] - before.cg["pod"])
	c.ProxyS = sec(after.cg["proxy"] - before.cg["proxy"])
	c.PeerS = sec(after.cg["peer"] - before.cg["peer"])
	c.KsoftirqdS = sec(after.ksoftirqd - before.ksoftirqd)
	c.TotalS = c.PodS + c.ProxyS + c.PeerS + c.KsoftirqdS
	c.GenS = float64(res.GenUserUS+res.GenSysUS) / 1e6
	c.GenUserS = float64(res.GenUserUS) / 1e6
	c.MachineBusyS = sec(after.machine.busy - before.machine.busy)
	c.MachineSoftirqS = sec(after.machine.softirq - before.machine.softirq)
	switch {
	case w.Kind == KindBulk && res.Bytes > 0:
		s.CPUPerUnit = c.TotalS / (float64(res.Bytes) / 1e9)
	case res.Ops > 0:
		s.CPUPerUnit = c.TotalS / float64(res.Ops) * 1000
	}
	p0, p1 := before.proxy, after.proxy
	s.Proxy = ProxyStats{Accepted: p1.Accepted - p0.Accepted, OrigDst: p1.OrigDst - p0.OrigDst,
		Fallback: p1.Fallback - p0.Fallback, DialFailed: p1.DialFailed - p0.DialFailed, InFlight: p1.InFlight}
	if s.Proxy.Accepted > 0 {
		s.Captured = float64(s.Proxy.OrigDst) / float64(s.Proxy.Accepted)
	}
	s.Conntrack = after.ct.sub(before.ct)
	s.TCP = tcpDelta(before.tcp, after.tcp)
	if after.progs != nil {
		s.BPF = map[string]ProgStat{}
		for name, a := range after.progs {
			bfr := before.progs[name]
			if bfr == nil {
				continue
			}
			s.BPF[name] = progStat(a.RunCount-bfr.RunCount, uint64(a.Runtime-bfr.Runtime), s.Ops)
		}
	}
	return s
}

func progStat(cnt, ns uint64, ops int64) ProgStat {
	p := ProgStat{RunCnt: cnt, RunTimeNS: ns}
	if cnt > 0 {
		p.NSPerRun = float64(ns) / float64(cnt)
	}
	if ops > 0 {
		p.RunsPerOp = float64(cnt) / float64(ops)
		p.NSPerOp = float64(ns) / float64(ops)
	}
	return p
}

// brief is the progress line's summary of a sample.
func (s *Sample) brief(w workload) string {
	switch w.Kind {
	case KindConn:
		out := fmt.Sprintf("%8.0f conn/s  CPU %.3f s/1k conn  p99 %.0f µs", s.Rate, s.CPUPerUnit, s.LatP99US)
		if s.Failed > 0 || s.Slow > 0 {
			out += fmt.Sprintf("  failed %d, >1s %d", s.Failed, s.Slow)
		}
		if s.Conntrack.Drop > 0 {
			out += fmt.Sprintf("  ct drops %d", s.Conntrack.Drop)
		}
		return out
	case KindRR:
		return fmt.Sprintf("p50 %.1f µs  p99 %.1f µs  p99.9 %.1f µs  (%.0f req/s)", s.LatP50US, s.LatP99US, s.LatP999US, s.Rate)
	default:
		return fmt.Sprintf("%6.2f Gbit/s  CPU %.2f s/GB", s.Rate, s.CPUPerUnit)
	}
}

func finishWorkload(wr *WorkloadResult) {
	ms := metricsFor(wr.w)
	for _, br := range wr.Backends {
		br.Summary = map[string]Summary{}
		for _, m := range ms {
			var v []float64
			for i := range br.Samples {
				v = append(v, m.get(&br.Samples[i]))
			}
			br.Summary[m.Key] = summarize(v)
		}
	}
	e := wr.backend(Ebpf)
	for _, m := range ms {
		if !m.Ratio {
			continue
		}
		for _, over := range []string{Iptables, None} {
			if r, ok := pairedRatio(m, over, e.Samples, wr.backend(over).Samples); ok {
				wr.Ratios = append(wr.Ratios, r)
			}
		}
	}
	var ops int64
	tot := map[string]*ProgStat{}
	for _, s := range e.Samples {
		ops += s.Ops
		for name, p := range s.BPF {
			if tot[name] == nil {
				tot[name] = &ProgStat{}
			}
			tot[name].RunCnt += p.RunCnt
			tot[name].RunTimeNS += p.RunTimeNS
		}
	}
	if len(tot) > 0 {
		wr.BPF = map[string]ProgStat{}
		for name, p := range tot {
			wr.BPF[name] = progStat(p.RunCnt, p.RunTimeNS, ops)
		}
	}
}

func finishGenerator(rep *Report) {
	g := rep.Generator
	if g == nil {
		return
	}
	var direct []float64
	for _, s := range g.Samples {
		direct = append(direct, s.Rate)
	}
	g.DirectRate = summarize(direct)
	for _, w := range rep.Workloads {
		if w.Name != "conn-out" {
			continue
		}
		none := w.backend(None)
		var rate, gen, user, total, userOp []float64
		for _, s := range none.Samples {
			rate = append(rate, s.Rate)
			gen = append(gen, s.CPU.GenS/s.ElapsedS)
			user = append(user, s.CPU.GenUserS/s.ElapsedS)
			total = append(total, s.CPU.TotalS/s.ElapsedS)
			userOp = append(userOp, s.CPU.GenUserS/float64(max(s.Ops, 1))*1e6)
		}
		g.NoneRate, g.GenCores, g.GenUserCores, g.TotalCores, g.GenUserUSOp =
			summarize(rate), summarize(gen), summarize(user), summarize(total), summarize(userOp)
	}
}
