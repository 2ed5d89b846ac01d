package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/scale"
)

func scaleCmd() *cobra.Command {
	var sizes []int
	var asJSON bool
	var markdown string
	c := &cobra.Command{
		Use:   "scale [--pods 1,100,1000]",
		Short: "Measure attach time and kernel memory per pod count, ebpf-redirect against iptables-restore",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			res, err := scale.Run(cmd.Context(), sizes, os.Stderr)
			if err != nil {
				return err
			}
			if markdown != "" {
				if err := os.WriteFile(markdown, []byte(res.Markdown()), 0o644); err != nil {
					return err
				}
			}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(res)
			}
			fmt.Fprint(cmd.OutOrStdout(), res.Markdown())
			return nil
		},
	}
	c.Flags().IntSliceVar(&sizes, "pods", []int{1, 100, 1000}, "pod counts to measure")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	c.Flags().StringVar(&markdown, "markdown", "", "also write the table to this file")
	return c
}
