package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/equiv"
)

func demoCmd(p *product) *cobra.Command {
	var o equiv.DemoOptions
	c := &cobra.Command{
		Use:   "demo [--case NAME]...",
		Short: "Run every traffic case on throwaway pods under iptables and under eBPF, side by side",
		Long: `demo builds throwaway pods (network namespaces, a veth, cgroups, a private bpffs),
starts a stand-in proxy and applications, sends each traffic case once under the
reference iptables ruleset and once under ebpf-redirect, prints where each landed,
and removes everything it made. It exits non-zero if any case differs.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			bin, err := p.resolve()
			if err != nil {
				return err
			}
			o.Context, o.Binary = cmd.Context(), bin
			return equiv.RunDemo(os.Stdout, o)
		},
	}
	c.Flags().StringSliceVar(&o.Cases, "case", nil, "run only these cases (repeatable)")
	c.Flags().StringVar(&o.ReferenceDir, "reference", "", "directory with inpod-rules.v4 and inpod-routes.sh (default: the embedded copy)")
	c.Flags().BoolVarP(&o.Verbose, "verbose", "v", false, "print every record, not only differences")
	return c
}
