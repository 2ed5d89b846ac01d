// Command ebpf-redirect gives a pod the in-pod traffic capture of Istio's
// ambient mode with eBPF instead of iptables. It is a thin client of the
// manager package; node agents drive it (or the package) once per pod.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/redirect"
	"github.com/ebpf-redirect/ebpf-redirect/internal/standin"
	"github.com/ebpf-redirect/ebpf-redirect/manager"
)

func main() {
	// The demo and the tests re-execute this binary as their stand-in
	// proxy and applications.
	standin.MaybeRunRole()

	// SIGINT/SIGTERM cancel the context (attach unwinds). The handler stays until
	// the process exits: restoring the default one first would let a signal that
	// lands after the work is done kill the process, turning a finished attach
	// into a failed exit.
	ctx, _ := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRoot().ExecuteContext(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "ebpf-redirect:", err)
		os.Exit(1)
	}
}

type globals struct {
	root     string
	logLevel string
	tcMode   string
	cfg      config.Config
	probe    string
	log      *slog.Logger
}

func (g *globals) manager() (*manager.Manager, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	g.log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	cfg := g.cfg
	a, err := netip.ParseAddr(g.probe)
	if err != nil {
		return nil, fmt.Errorf("--probe-addr: %w", err)
	}
	cfg.ProbeAddr = a
	return manager.New(manager.Options{BPFFS: g.root, Config: &cfg, TCMode: g.tcMode, Logger: g.log})
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
	pf := root.PersistentFlags()
	pf.StringVar(&g.root, "bpffs", redirect.DefaultRoot, "directory on a bpffs mount where programs, maps and links are pinned")
	pf.StringVar(&g.logLevel, "log-level", "info", "debug, info, warn or error")
	pf.StringVar(&g.tcMode, "tc-mode", "auto", "auto (tcx if the kernel has it), tcx, or legacy (clsact + cls_bpf)")
	configFlags(pf, g)
	root.AddCommand(attachCmd(g), detachCmd(g), listCmd(g), reconcileCmd(g), statsCmd(g), explainCmd(g),
		upgradeCmd(g), serveCmd(g), demoCmd(), scaleCmd(), benchCmd())
	return root
}

func attachCmd(g *globals) *cobra.Command {
	var p manager.Pod
	c := &cobra.Command{
		Use:   "attach --pod-id ID --netns PATH --cgroup PATH [--proxy-cgroup PATH]",
		Short: "Capture one pod's traffic; stays in place after the command exits",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := g.manager()
			if err != nil {
				return err
			}
			res, err := m.AttachPod(cmd.Context(), p)
			if err != nil {
				return err
			}
			switch {
			case res.AlreadyAttached:
				fmt.Fprintf(cmd.OutOrStdout(), "pod %s already attached; nothing to do\n", p.ID)
			case res.Repaired:
				fmt.Fprintf(cmd.OutOrStdout(), "pod %s attached (an earlier broken attach was removed first)\n", p.ID)
			default:
				fmt.Fprintf(cmd.OutOrStdout(), "pod %s attached\n", p.ID)
			}
			return nil
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
			m, err := g.manager()
			if err != nil {
				return err
			}
			if err := m.DetachPod(cmd.Context(), id); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "pod %s detached\n", id)
			return nil
		},
	}
	c.Flags().StringVar(&id, "pod-id", "", "id given to attach")
	_ = c.MarkFlagRequired("pod-id")
	return c
}
