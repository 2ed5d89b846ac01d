package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/bench"
)

func benchCmd(p *product) *cobra.Command {
	var (
		o        bench.Options
		asJSON   bool
		quiet    bool
		markdown string
		svg      string
		intro    string
		duration string
	)
	c := &cobra.Command{
		Use:   "bench [--quick] [--json] [--markdown FILE] [--svg FILE]",
		Short: "Measure eBPF against iptables against no capture on throwaway pods",
		Long: `bench builds three throwaway pods — none (the client connects to the proxy's
listener itself), iptables (the reference ruleset) and ebpf (ebpf-redirect attach) —
with the same generator, proxy and servers in each, and runs every workload under the
three in turn, several times: connection rate and CPU per connection, request/response
latency, bulk throughput, outbound and inbound, and the connection rate with a small
nf_conntrack_max. It prints medians and spreads, ratios only where the spread is
smaller than the difference, the goals met or missed, and the eBPF programs' run
counts and times. Everything it makes is removed at the end, also on Ctrl-C;
nf_conntrack_max is restored.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if duration != "" {
				d, err := time.ParseDuration(duration)
				if err != nil {
					return fmt.Errorf("--duration: %w", err)
				}
				o.ConnDuration, o.RRDuration, o.BulkDuration = d, d, d
			}
			bin, err := p.resolve()
			if err != nil {
				return err
			}
			o.Binary = bin
			if !quiet {
				o.Progress = os.Stderr
			}
			rep, err := bench.Run(cmd.Context(), o)
			if rep == nil || len(rep.Workloads) == 0 {
				return err
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, "ebpf-redirect-lab: bench stopped early; partial results follow:", err)
			}
			var werr error
			if asJSON {
				werr = bench.WriteJSON(cmd.OutOrStdout(), rep)
			} else {
				werr = bench.WriteTable(cmd.OutOrStdout(), rep)
			}
			if err == nil && svg != "" {
				werr = errors.Join(werr, writeFile(svg, func(f *os.File) error { return bench.WriteSVG(f, rep) }))
			}
			if err == nil && markdown != "" {
				rel := ""
				if svg != "" {
					if r, rerr := filepath.Rel(filepath.Dir(markdown), svg); rerr == nil {
						rel = r
					}
				}
				werr = errors.Join(werr, bench.WriteMarkdown(markdown, rep, rel, intro))
			}
			return errors.Join(err, werr)
		},
	}
	f := c.Flags()
	f.BoolVar(&o.Quick, "quick", false, "short runs and 3 repetitions: finishes in under a minute")
	f.BoolVar(&asJSON, "json", false, "print the report as JSON")
	f.BoolVarP(&quiet, "quiet", "q", false, "no progress lines on stderr")
	f.StringVar(&markdown, "markdown", "", "write the results into this markdown file (between its result markers, or as a new file)")
	f.StringVar(&svg, "svg", "", "write a plot of the ratios to this SVG file")
	f.StringVar(&intro, "note", "", "a sentence to put above the results in the markdown (e.g. the state of the machine)")
	f.IntVar(&o.Reps, "reps", 0, "repetitions (default 5, --quick 3)")
	f.StringVar(&duration, "duration", "", "length of each conn, rr and bulk run (default 3s/3s/2s, --quick 300ms)")
	f.DurationVar(&o.PressureDuration, "pressure-duration", 0, "length of each conntrack-out run (default 3s, --quick 600ms)")
	f.DurationVar(&o.Warmup, "warmup", 0, "warm-up per pod and direction (default 500ms, --quick 100ms)")
	f.IntVar(&o.ConnWorkers, "conn-workers", 0, "concurrent clients of the connection-rate runs (default 8)")
	f.IntVar(&o.RRWorkers, "rr-conns", 0, "persistent connections of the latency runs (default 1)")
	f.IntVar(&o.BulkWorkers, "bulk-streams", 0, "streams of the bulk runs (default 1)")
	f.IntVar(&o.MsgSize, "size", 0, "request and response bytes (default 100)")
	f.DurationVar(&o.Timeout, "timeout", 0, "bound on every connect and read of the generator (default 3s, --quick 1.5s)")
	f.IntVar(&o.ConntrackMax, "conntrack-max", 0, "nf_conntrack_max during conntrack-out (default 2048; machine-wide, restored after)")
	f.StringSliceVar(&o.Workloads, "workload", nil, fmt.Sprintf("run only these workloads (repeatable): %v", bench.WorkloadNames()))
	f.BoolVar(&o.NoPin, "no-pin", false, "do not pin the generator's threads to CPUs")
	f.BoolVar(&o.NoBPFStats, "no-bpf-stats", false, "do not enable BPF run-time statistics during the ebpf runs")
	f.StringVar(&o.ReferenceDir, "reference", "", "directory with inpod-rules.v4 and inpod-routes.sh (default: the embedded copy)")
	return c
}

func writeFile(path string, write func(*os.File) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := write(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
