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
	"github.com/ebpf-redirect/ebpf-redirect/manager"
)

func main() {
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

// globals are the flags every command has: where the pins are, and logging.
type globals struct {
	root     string
	logLevel string
	log      *slog.Logger
}

// node is the node's config, for the commands that may load the programs
// (attach, reconcile, upgrade, serve). Validated once, by manager.New.
type node struct {
	cfg    config.Config
	tcMode string
}

// seam lets a test build (-tags faultinject) change the options; nil in the
// product.
var seam func(*manager.Options)

// manager opens the pins. n is nil for the commands that only read or
// remove what is pinned, which take no config flags.
func (g *globals) manager(cmd *cobra.Command, n *node) (*manager.Manager, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	g.log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	o := manager.Options{BPFFS: g.root, Logger: g.log}
	if n != nil {
		o.Config, o.TCMode = &n.cfg, n.tcMode
		// As node agents do on a fresh machine; an explicit --bpffs that is
		// not a bpffs stays an error.
		o.MountBPFFS = !cmd.Flags().Changed("bpffs")
	}
	if seam != nil {
		seam(&o)
	}
	return manager.New(o)
}

// addrValue is a netip.Addr flag.
type addrValue struct{ a *netip.Addr }

func (v addrValue) String() string {
	if v.a == nil || !v.a.IsValid() {
		return ""
	}
	return v.a.String()
}

func (v addrValue) Set(s string) error {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return err
	}
	*v.a = a
	return nil
}

func (addrValue) Type() string { return "addr" }

// nodeFlags adds the node's config flags to a command that may load the
// programs. Defaults are the reference's.
func nodeFlags(fs *pflag.FlagSet) *node {
	d := config.Default()
	n := &node{cfg: d}
	fs.Uint16Var(&n.cfg.OutboundPort, "outbound-port", d.OutboundPort, "proxy port new outbound TCP is redirected to")
	fs.Uint16Var(&n.cfg.InboundPort, "inbound-port", d.InboundPort, "proxy port new inbound TCP is redirected to")
	fs.Uint16Var(&n.cfg.HBONEPort, "hbone-port", d.HBONEPort, "inbound port never redirected (the proxy's tunnel)")
	fs.Var(addrValue{&n.cfg.ProbeAddr}, "probe-addr", "kubelet probe address, never redirected")
	fs.Var(addrValue{&n.cfg.ProbeAddr6}, "probe-addr6", "its IPv6 twin")
	fs.BoolVar(&n.cfg.IPv6, "ipv6", d.IPv6, "capture IPv6 too, as the ip6tables twin of the ruleset does (--ipv6=false: IPv6 untouched)")
	fs.Uint32Var(&n.cfg.ProxyMark, "proxy-mark", d.ProxyMark, "mark of the proxy's own sockets")
	fs.Uint32Var(&n.cfg.ConnMark, "conn-mark", d.ConnMark, "mark that routes replies back to the proxy")
	fs.Uint32Var(&n.cfg.MarkMask, "mark-mask", d.MarkMask, "marks are compared under this mask")
	fs.IntVar(&n.cfg.RouteTable, "route-table", d.RouteTable, "policy route table for the connection mark")
	fs.IntVar(&n.cfg.RulePriority, "rule-priority", d.RulePriority, "ip rule preference of the policy route")
	fs.Uint32Var(&n.cfg.MaxPods, "max-pods", d.MaxPods, "pods the node's maps hold")
	fs.Uint32Var(&n.cfg.MaxFlows, "max-flows", d.MaxFlows, "redirected connections tracked at once, per direction (the oldest is evicted beyond it)")
	fs.StringVar(&n.tcMode, "tc-mode", "auto", "auto (tcx if the kernel has it), tcx, or legacy (clsact + cls_bpf)")
	return n
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
	root.AddCommand(attachCmd(g), detachCmd(g), listCmd(g), reconcileCmd(g), statsCmd(g), explainCmd(g),
		upgradeCmd(g), serveCmd(g))
	return root
}

func attachCmd(g *globals) *cobra.Command {
	var p manager.Pod
	var n *node
	c := &cobra.Command{
		Use:   "attach --pod-id ID --netns PATH --cgroup PATH [--proxy-cgroup PATH]",
		Short: "Capture one pod's traffic; stays in place after the command exits",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := g.manager(cmd, n)
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
	n = nodeFlags(c.Flags())
	return c
}

func detachCmd(g *globals) *cobra.Command {
	var id string
	c := &cobra.Command{
		Use:   "detach --pod-id ID",
		Short: "Remove everything attach made for the pod: links, pins, map entries, route",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := g.manager(cmd, nil)
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
