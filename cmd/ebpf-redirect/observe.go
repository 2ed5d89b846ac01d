package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/ebpf-redirect/ebpf-redirect/manager"
)

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func listCmd(g *globals) *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "list",
		Short: "Show the attached pods and their state (healthy, defunct, attaching)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := g.manager(cmd, nil)
			if err != nil {
				return err
			}
			pods, err := m.Pods()
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), pods)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "POD\tSTATE\tPOD IP\tPOD IPV6\tTC\tNETNS\tCGROUP\tPROBLEM")
			for _, p := range pods {
				tc := ""
				if len(p.TC) > 0 {
					tc = string(p.TC[0].Mode)
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.ID, p.Health, dash(p.PodIP), dash(p.PodIP6), tc, p.Netns, p.Cgroup, p.Problem)
			}
			return w.Flush()
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func reconcileCmd(g *globals) *cobra.Command {
	var podsFile string
	var n *node
	c := &cobra.Command{
		Use:   "reconcile [--pods FILE]",
		Short: "Remove gone or half-attached pods; with --pods, make the attached set exactly that list",
		Long: `Without --pods, detaches pods whose netns or cgroup is gone and attaches that
never finished (a crashed agent), and keeps healthy pods. With --pods FILE (a JSON
array of {"ID","Netns","Cgroup","ProxyCgroup"}; - for stdin), also detaches pods not
in the list and attaches (or repairs) those in it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := g.manager(cmd, n)
			if err != nil {
				return err
			}
			var live []manager.Pod
			if podsFile != "" {
				var r io.Reader = os.Stdin
				if podsFile != "-" {
					f, err := os.Open(podsFile)
					if err != nil {
						return err
					}
					defer f.Close()
					r = f
				}
				if err := json.NewDecoder(r).Decode(&live); err != nil {
					return fmt.Errorf("--pods %s: %w", podsFile, err)
				}
				if live == nil {
					live = []manager.Pod{}
				}
			}
			rep, err := m.Reconcile(cmd.Context(), live)
			if perr := printJSON(cmd.OutOrStdout(), rep); perr != nil {
				return perr
			}
			return err
		},
	}
	c.Flags().StringVar(&podsFile, "pods", "", "JSON list of the pods that should be attached (- for stdin)")
	n = nodeFlags(c.Flags())
	return c
}

func statsCmd(g *globals) *cobra.Command {
	var id string
	var asJSON bool
	c := &cobra.Command{
		Use:   "stats [--pod-id ID] [--json]",
		Short: "Connections taken by each rule of the reference, per pod (like iptables-save -c)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := g.manager(cmd, nil)
			if err != nil {
				return err
			}
			all := map[string][]manager.RuleCount{}
			if id != "" {
				rc, err := m.Stats(id)
				if err != nil {
					return err
				}
				all[id] = rc
			} else if all, err = m.StatsAll(); err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), all)
			}
			ids := make([]string, 0, len(all))
			for k := range all {
				ids = append(ids, k)
			}
			sort.Strings(ids)
			w := cmd.OutOrStdout()
			for _, pid := range ids {
				fam := ""
				for _, rc := range all[pid] {
					if rc.Family != fam {
						fam = rc.Family
						tool := map[string]string{"ipv4": "iptables", "ipv6": "ip6tables"}[fam]
						fmt.Fprintf(w, "# pod %s, %s (%s; connections per rule)\n", pid, fam, tool)
					}
					fmt.Fprintf(w, "[%d] %-16s %s\n", rc.Connections, rc.Rule, rc.Text)
				}
			}
			return nil
		},
	}
	c.Flags().StringVar(&id, "pod-id", "", "only this pod")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func explainCmd(g *globals) *cobra.Command {
	var id, dst, src, mark string
	var q manager.Query
	var out, asJSON bool
	c := &cobra.Command{
		Use:   "explain --pod-id ID --dst ADDR:PORT [--src ADDR:PORT] [--mark M] [--in|--out] [--udp] [--device IF] [--iface IF]",
		Short: "Which rule decides a connection of the pod, and what happens to it (asks the pod's own programs)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if q.Inbound && out {
				return errors.New("--in and --out exclude each other")
			}
			if q.Inbound && q.Device != "" {
				return errors.New("--device is the outbound socket's SO_BINDTODEVICE; inbound, use --iface")
			}
			if !q.Inbound && q.Iface != "" {
				return errors.New("--iface is where an inbound connection arrives; outbound, use --device")
			}
			var err error
			if q.Dst, err = netip.ParseAddrPort(dst); err != nil {
				return fmt.Errorf("--dst %q: want ADDR:PORT ([v6]:port for IPv6): %v", dst, err)
			}
			if src != "" {
				if q.Src, err = netip.ParseAddrPort(src); err != nil {
					return fmt.Errorf("--src %q: want ADDR:PORT ([v6]:port for IPv6): %v", src, err)
				}
				if q.Src.Addr().Unmap().Is4() != q.Dst.Addr().Unmap().Is4() {
					return fmt.Errorf("--src %s and --dst %s are of different families", src, dst)
				}
			} else if q.Inbound {
				return errors.New("--in needs --src (the remote peer)")
			}
			if mark != "" {
				v, err := strconv.ParseUint(mark, 0, 32)
				if err != nil {
					return fmt.Errorf("--mark %q: %w", mark, err)
				}
				q.Mark = uint32(v)
			}
			m, err := g.manager(cmd, nil)
			if err != nil {
				return err
			}
			d, err := m.Explain(id, q)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), d)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintf(w, "rule\t%s (%s, %s)\n", d.Rule.Name, d.Rule.Family, d.Rule.Chain)
			fmt.Fprintf(w, "reference\t%s\n", d.Rule.Text)
			fmt.Fprintf(w, "redirected\t%v\n", d.Redirected)
			fmt.Fprintf(w, "goes to\t%s\n", d.To)
			fmt.Fprintf(w, "so\t%s\n", d.Note)
			return w.Flush()
		},
	}
	f := c.Flags()
	f.StringVar(&id, "pod-id", "", "the pod")
	f.StringVar(&dst, "dst", "", "destination ADDR:PORT")
	f.StringVar(&src, "src", "", "source ADDR:PORT (inbound: the remote peer)")
	f.StringVar(&mark, "mark", "", "socket (outbound) or packet (inbound) mark, e.g. 0x539")
	f.BoolVar(&q.Inbound, "in", false, "a connection into the pod")
	f.BoolVar(&out, "out", false, "a connection out of the pod (the default)")
	f.BoolVar(&q.UDP, "udp", false, "UDP instead of TCP")
	f.StringVar(&q.Device, "device", "", "outbound: the interface the socket is bound to (SO_BINDTODEVICE), e.g. lo")
	f.StringVar(&q.Iface, "iface", "", "inbound: the pod interface the connection arrives on (default: the one holding --dst, else the first)")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	_ = c.MarkFlagRequired("pod-id")
	_ = c.MarkFlagRequired("dst")
	return c
}

func upgradeCmd(g *globals) *cobra.Command {
	var force, asJSON bool
	var n *node
	c := &cobra.Command{
		Use:   "upgrade [--force]",
		Short: "Swap this binary's programs into every attached pod (atomic link updates); the only command that changes pinned programs",
		Long: `upgrade loads this binary's programs on top of the pinned maps (their entries and
sizes carry over; maps the new programs add are created), swaps them into every
pod's and proxy's links with atomic link updates, and re-pins them with the
schema of this binary. It refuses, changing nothing, pins of a newer schema, a
node config other than the pinned one, and programs that change the layout of a
pinned map; if a link cannot be updated, every link goes back to the programs it
ran. Without --force it does nothing when the pinned programs are this binary's.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := g.manager(cmd, n)
			if err != nil {
				return err
			}
			rep, err := m.Upgrade(cmd.Context(), force)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), rep)
			}
			if rep.Unchanged {
				fmt.Fprintf(cmd.OutOrStdout(), "the pinned programs are this binary's (%s); nothing to do\n", rep.To)
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "upgraded %s -> %s: %d pods, %d links\n", rep.From, rep.To, rep.Pods, rep.Links)
			return nil
		},
	}
	c.Flags().BoolVar(&force, "force", false, "reload and swap even if the pinned programs are of this version")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	n = nodeFlags(c.Flags())
	return c
}
