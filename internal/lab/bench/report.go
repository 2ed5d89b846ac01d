package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
)

// WriteJSON prints the report for machines.
func WriteJSON(w io.Writer, rep *Report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}

// num prints a value with as many digits as it deserves.
func num(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

// cell prints a summary as "median ±half-range%".
func cell(s Summary) string {
	if s.N == 0 {
		return "-"
	}
	if s.Median == 0 {
		return fmt.Sprintf("%s (max %s)", num(s.Median), num(s.Max))
	}
	return fmt.Sprintf("%s ±%.0f%%", num(s.Median), 100*(s.Max-s.Min)/2/math.Abs(s.Median))
}

func (w *WorkloadResult) ratio(metric, over string) (Ratio, bool) {
	for _, r := range w.Ratios {
		if r.Metric == metric && r.Over == over {
			return r, true
		}
	}
	return Ratio{}, false
}

// row is one line of the results table.
type row struct {
	workload, metric string
	cells            [3]string // none, iptables, ebpf
	vsIpt, vsNone    string
}

func rows(rep *Report) []row {
	var out []row
	for _, w := range rep.Workloads {
		for i, m := range metricsFor(w.w0()) {
			r := row{metric: m.Label}
			if i == 0 {
				r.workload = w.Name
			}
			for j, name := range Backends {
				if b := w.backend(name); b != nil {
					r.cells[j] = cell(b.Summary[m.Key])
				}
			}
			r.vsIpt, r.vsNone = "", ""
			if x, ok := w.ratio(m.Key, Iptables); ok {
				r.vsIpt = x.String()
			}
			if x, ok := w.ratio(m.Key, None); ok {
				r.vsNone = x.String()
			}
			out = append(out, r)
		}
	}
	return out
}

// w0 recovers the workload definition (the report may have been decoded from JSON).
func (w *WorkloadResult) w0() workload {
	if w.w.Name != "" {
		return w.w
	}
	for _, d := range workloads {
		if d.Name == w.Name {
			return d
		}
	}
	return workload{Name: w.Name, Kind: w.Kind, Dir: w.Direction}
}

func header1(rep *Report) []string {
	m, s := rep.Meta, rep.Settings
	pin := "pinned"
	if !s.Pinned {
		pin = "not pinned"
	}
	return []string{
		fmt.Sprintf("kernel:  %s (%s)", m.Kernel, m.Arch),
		fmt.Sprintf("cpu:     %s × %d", m.CPU, m.CPUs),
		fmt.Sprintf("date:    %s, %s", m.Date, m.Go),
		fmt.Sprintf("method:  %d repetitions, each running none, iptables, ebpf in turn; conn %gs, rr %gs, bulk %gs, conntrack %gs per run",
			s.Reps, s.ConnDurationS, s.RRDurationS, s.BulkDurationS, s.PressureDuration),
		fmt.Sprintf("load:    %d conn workers, %d rr connections, %d bulk streams (%s threads); %d-byte messages, nf_conntrack_max %d for conntrack-out",
			s.ConnWorkers, s.RRWorkers, s.BulkWorkers, pin, s.MsgSize, s.ConntrackMax),
	}
}

// WriteTable prints the report for people.
func WriteTable(out io.Writer, rep *Report) error {
	fmt.Fprintln(out, "ebpf-redirect-lab bench")
	for _, l := range header1(rep) {
		fmt.Fprintln(out, "  "+l)
	}
	fmt.Fprintln(out, "  cells:   median ±half the range over the repetitions; ratios are eBPF / other, per repetition,")
	fmt.Fprintln(out, "           shown as ~1 (noise) when their spread is larger than their distance from 1")
	fmt.Fprintln(out)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKLOAD\tMETRIC\tNONE\tIPTABLES\tEBPF\tEBPF/IPTABLES\tEBPF/NONE")
	for _, r := range rows(rep) {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.workload, r.metric, r.cells[0], r.cells[1], r.cells[2], r.vsIpt, r.vsNone)
	}
	tw.Flush()
	fmt.Fprintln(out)
	fmt.Fprintln(out, "TARGETS")
	for _, t := range rep.Targets {
		fmt.Fprintf(out, "  %-8s %s — %s: %s\n", strings.ToUpper(t.Status), t.Goal, t.Workload, t.Detail)
	}
	if g := generatorLines(rep); len(g) > 0 {
		fmt.Fprintln(out)
		fmt.Fprintln(out, "GENERATOR")
		for _, l := range g {
			fmt.Fprintln(out, "  "+l)
		}
	}
	if len(rep.Workloads) > 0 {
		fmt.Fprintln(out)
		fmt.Fprintln(out, "EBPF PROGRAMS (bpf_prog_info run_cnt / run_time_ns during the ebpf runs, per connection, exchange or stream)")
		tw = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "WORKLOAD\tPROGRAM\tRUNS\tNS/RUN\tRUNS/OP\tNS/OP")
		for _, w := range rep.Workloads {
			for _, name := range sortedProgs(w.BPF) {
				p := w.BPF[name]
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", w.Name, name, p.RunCnt, num(p.NSPerRun), num(p.RunsPerOp), num(p.NSPerOp))
			}
		}
		tw.Flush()
	}
	if len(rep.Notes) > 0 {
		fmt.Fprintln(out)
		fmt.Fprintln(out, "NOTES")
		for _, n := range rep.Notes {
			fmt.Fprintln(out, "  - "+n)
		}
	}
	return nil
}

func sortedProgs(m map[string]ProgStat) []string {
	var names []string
	for n, p := range m {
		if p.RunCnt > 0 {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return names
}

func generatorLines(rep *Report) []string {
	g := rep.Generator
	if g == nil || g.NoneRate.N == 0 {
		return nil
	}
	lines := []string{
		fmt.Sprintf("%d worker threads, blocking system calls; at none's conn-out rate (%s conn/s) they used %s cores (user space %s cores, %s µs per connection); everything of the pod used %s cores",
			g.Workers, num(g.NoneRate.Median), num(g.GenCores.Median), num(g.GenUserCores.Median), num(g.GenUserUSOp.Median), num(g.TotalCores.Median)),
		fmt.Sprintf("the same generator straight to R's server (no proxy, no capture) makes %s conn/s, %s× none's rate: the proxy path, not the generator, sets the rate",
			num(g.DirectRate.Median), num(g.DirectRate.Median/g.NoneRate.Median)),
		"(the kernel work of loopback and veth runs in the sending thread's context, so the generator's system time includes part of the network path it measures)",
	}
	return lines
}

// notes are observations the numbers support, for the reader of the table.
func notes(rep *Report) []string {
	var n []string
	for _, w := range rep.Workloads {
		if !w.w0().Pressure {
			continue
		}
		for _, name := range Backends {
			b := w.backend(name)
			var drops, failed, slow int64
			for _, s := range b.Samples {
				drops += s.Conntrack.Drop
				failed += s.Failed
				slow += s.Slow
			}
			n = append(n, fmt.Sprintf("%s under %s: %s conn/s, %d failed and %d slower than 1 s over %d runs, %d conntrack drops",
				w.Name, name, num(b.Summary["rate"].Median), failed, slow, len(b.Samples), drops))
		}
	}
	for _, w := range rep.Workloads {
		var uncaptured []string
		for _, name := range []string{Iptables, Ebpf} {
			for _, s := range w.backend(name).Samples {
				if s.Captured < 1 {
					uncaptured = append(uncaptured, name)
					break
				}
			}
		}
		if len(uncaptured) > 0 {
			n = append(n, fmt.Sprintf("%s: not every connection was captured under %v", w.Name, uncaptured))
		}
	}
	if rep.Settings.BPFStats {
		n = append(n, "the ebpf runs had BPF run-time statistics on (two clock reads per program run), so their numbers include that overhead")
	}
	return n
}

// Markdown markers: WriteMarkdown replaces what is between them and keeps the rest.
const (
	mdBegin = "<!-- bench:results:begin (written by `ebpf-redirect-lab bench --markdown`; edits inside are lost) -->"
	mdEnd   = "<!-- bench:results:end -->"
)

// WriteMarkdown writes the results into the file at path, between the markers if the
// file has them (the rest of the document stays as it is), else as a new document.
// svg, when not empty, is the plot's path relative to the document.
func WriteMarkdown(path string, rep *Report, svg string, intro string) error {
	var b strings.Builder
	markdownResults(&b, rep, svg, intro)
	block := mdBegin + "\n" + b.String() + mdEnd
	old, err := os.ReadFile(path)
	var doc string
	switch {
	case err == nil && strings.Contains(string(old), mdBegin) && strings.Contains(string(old), mdEnd):
		s := string(old)
		i, j := strings.Index(s, mdBegin), strings.Index(s, mdEnd)+len(mdEnd)
		doc = s[:i] + block + s[j:]
	case err == nil || os.IsNotExist(err):
		doc = "# Benchmarks\n\n" + block + "\n"
	default:
		return err
	}
	return os.WriteFile(path, []byte(doc), 0o644)
}

func markdownResults(b *strings.Builder, rep *Report, svg, intro string) {
	fmt.Fprintln(b)
	for _, l := range header1(rep) {
		k, v, _ := strings.Cut(l, ":")
		fmt.Fprintf(b, "- **%s**: %s\n", k, strings.TrimSpace(v))
	}
	fmt.Fprintf(b, "- **command**: `%s`\n", rep.Meta.Command)
	if intro != "" {
		fmt.Fprintf(b, "\n%s\n", intro)
	}
	fmt.Fprintln(b, "\nCells are the median ± half the range over the repetitions. Ratios are eBPF / other, taken")
	fmt.Fprintln(b, "repetition by repetition; \"~1 (noise)\" means their spread is larger than their distance from 1.")
	fmt.Fprintln(b)
	fmt.Fprintln(b, "| workload | metric | none | iptables | ebpf | ebpf / iptables | ebpf / none |")
	fmt.Fprintln(b, "|---|---|---:|---:|---:|---:|---:|")
	for _, r := range rows(rep) {
		fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | %s |\n", r.workload, r.metric, r.cells[0], r.cells[1], r.cells[2], r.vsIpt, r.vsNone)
	}
	if svg != "" {
		fmt.Fprintf(b, "\n![eBPF against iptables and none, as ratios](%s)\n", svg)
	}
	fmt.Fprintln(b, "\n### Targets")
	fmt.Fprintln(b)
	fmt.Fprintln(b, "| goal | workload | status | measured |")
	fmt.Fprintln(b, "|---|---|---|---|")
	for _, t := range rep.Targets {
		fmt.Fprintf(b, "| %s | %s | **%s** | %s |\n", t.Goal, t.Workload, t.Status, t.Detail)
	}
	if g := generatorLines(rep); len(g) > 0 {
		fmt.Fprintln(b, "\n### The generator")
		fmt.Fprintln(b)
		for _, l := range g {
			fmt.Fprintf(b, "- %s\n", l)
		}
	}
	fmt.Fprintln(b, "\n### eBPF programs")
	fmt.Fprintln(b)
	fmt.Fprintln(b, "`bpf_prog_info` run_cnt and run_time_ns over the ebpf runs, per connection (conn), exchange (rr) or stream (bulk).")
	fmt.Fprintln(b)
	fmt.Fprintln(b, "| workload | program | runs | ns/run | runs/op | ns/op |")
	fmt.Fprintln(b, "|---|---|---:|---:|---:|---:|")
	for _, w := range rep.Workloads {
		for _, name := range sortedProgs(w.BPF) {
			p := w.BPF[name]
			fmt.Fprintf(b, "| %s | %s | %d | %s | %s | %s |\n", w.Name, name, p.RunCnt, num(p.NSPerRun), num(p.RunsPerOp), num(p.NSPerOp))
		}
	}
	fmt.Fprintln(b, "\n### CPU by place (medians, CPU seconds per run)")
	fmt.Fprintln(b)
	fmt.Fprintln(b, "| workload | backend | total | pod cgroup | proxy cgroup | R cgroup | ksoftirqd | generator threads (user) |")
	fmt.Fprintln(b, "|---|---|---:|---:|---:|---:|---:|---:|")
	for _, w := range rep.Workloads {
		for _, name := range Backends {
			br := w.backend(name)
			med := func(f func(*Sample) float64) string {
				var v []float64
				for i := range br.Samples {
					v = append(v, f(&br.Samples[i]))
				}
				return num(summarize(v).Median)
			}
			fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | %s | %s (%s) |\n", w.Name, name,
				med(func(s *Sample) float64 { return s.CPU.TotalS }), med(func(s *Sample) float64 { return s.CPU.PodS }),
				med(func(s *Sample) float64 { return s.CPU.ProxyS }), med(func(s *Sample) float64 { return s.CPU.PeerS }),
				med(func(s *Sample) float64 { return s.CPU.KsoftirqdS }), med(func(s *Sample) float64 { return s.CPU.GenS }),
				med(func(s *Sample) float64 { return s.CPU.GenUserS }))
		}
	}
	if len(rep.Notes) > 0 {
		fmt.Fprintln(b, "\n### Notes")
		fmt.Fprintln(b)
		for _, n := range rep.Notes {
			fmt.Fprintf(b, "- %s\n", n)
		}
	}
	fmt.Fprintln(b)
}
