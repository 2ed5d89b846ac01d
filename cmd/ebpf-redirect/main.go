// Command ebpf-redirect gives a pod the in-pod traffic capture of Istio's
// ambient mode with eBPF instead of iptables. Node agents drive it once per
// pod: attach, detach, list.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/redirect"
	"github.com/ebpf-redirect/ebpf-redirect/internal/standin"
)

func main() {
	// The demo and the tests re-execute this binary as their stand-in
	// proxy and applications.
	standin.MaybeRunRole()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRoot().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "ebpf-redirect:", err)
		os.Exit(1)
	}
}

type globals struct {
	root     string
	logLevel string
	cfg      config.Config
	probe    string
}

func (g *globals) options() (redirect.Options, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
		return redirect.Options{}, fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	cfg := g.cfg
	a, err := netip.ParseAddr(g.probe)
	if err != nil {
		return redirect.Options{}, fmt.Errorf("--probe-addr: %w", err)
	}
	cfg.ProbeAddr = a
	if err := cfg.Validate(); err != nil {
		return redirect.Options{}, fmt.Errorf("config: %w", err)
	}
	return redirect.Options{Root: g.root, Config: cfg, Log: log}, nil
}

func configFlags(fs *pflag.FlagSet, g *globals) {
	d := config.Default()
	g.cfg = d
	fs.Uint16Var(&g.cfg.OutboundPort, "outbound-port", d.OutboundPort, "proxy port new outbound TCP is redirected to")
	fs.Uint16Var(&g.cfg.InboundPort, "inbound-port", d.InboundPort, "proxy port new inbound TCP is redirected to")
	fs.Uint16Var(&g.cfg.HBONEPort, "hbone-port", d.HBONEPort, "inbound port never redirected (the proxy's tunnel)")
	fs.StringVar(&g.probe, "probe-addr", d.ProbeAddr.String(), "kubelet probe address, never redirected")
	fs.Uint32Var(&g.cfg.ProxyMark, "proxy-mark", d.ProxyMark, "mark of the proxy's own sockets")
	fs.Uint32Var(&g.cfg.ConnMark, "conn-mark", d.ConnMark, "mark that routes replies back to the proxy")
	fs.Uint32Var(&g.cfg.MarkMask, "mark-mask", d.MarkMask, "marks are compared under this mask")
	fs.IntVar(&g.cfg.RouteTable, "route-table", d.RouteTable, "policy route table for the connection mark")
	fs.IntVar(&g.cfg.RulePriority, "rule-priority", d.RulePriority, "ip rule preference of the policy route")
}

func newRoot() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:           "ebpf-redirect",
		Short:         "Transparent in-pod traffic capture for a mesh proxy, with eBPF instead of iptables",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.root, "bpffs", redirect.DefaultRoot, "directory on a bpffs mount where programs, maps and links are pinned")
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "debug, info, warn or error")
	configFlags(root.PersistentFlags(), g)
	root.AddCommand(attachCmd(g), detachCmd(g), listCmd(g), demoCmd(), benchCmd())
	return root
}

func attachCmd(g *globals) *cobra.Command {
	var p redirect.Pod
	c := &cobra.Command{
		Use:   "attach --pod-id ID --netns PATH --cgroup PATH [--proxy-cgroup PATH]",
		Short: "Capture one pod's traffic; stays in place after the command exits",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o, err := g.options()
			if err != nil {
				return err
			}
			return redirect.Attach(cmd.Context(), o, p)
		},
	}
	c.Flags().StringVar(&p.ID, "pod-id", "", "unique id of the pod (letters, digits, '.', '_', '-')")
	c.Flags().StringVar(&p.Netns, "netns", "", "the pod's netns file (/run/netns/NAME or /proc/PID/ns/net)")
	c.Flags().StringVar(&p.Cgroup, "cgroup", "", "the pod's cgroup v2 directory")
	c.Flags().StringVar(&p.ProxyCgroup, "proxy-cgroup", "", "the proxy's cgroup v2 directory (answers SO_ORIGINAL_DST)")
	for _, f := range []string{"pod-id", "netns", "cgroup"} {
		_ = c.MarkFlagRequired(f)
	}
	return c
}

func detachCmd(g *globals) *cobra.Command {
	var id string
	c := &cobra.Command{
		Use:   "detach --pod-id ID",
		Short: "Remove everything attach made for the pod: links, pins, map entries, route",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o, err := g.options()
			if err != nil {
				return err
			}
			return redirect.Detach(cmd.Context(), o, id)
		},
	}
	c.Flags().StringVar(&id, "pod-id", "", "id given to attach")
	_ = c.MarkFlagRequired("pod-id")
	return c
}

func listCmd(g *globals) *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "list",
		Short: "Show the attached pods",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o, err := g.options()
			if err != nil {
				return err
			}
			recs, err := redirect.List(o)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(recs)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "POD\tSTATE\tPOD IP\tNETNS\tCGROUP")
			for _, r := range recs {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", r.ID, r.State, r.PodIP, r.Netns, r.Cgroup)
			}
			return w.Flush()
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}
