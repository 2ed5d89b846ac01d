// Command ebpf-redirect-lab is the laboratory around the product: the
// differential demo (every traffic case under the reference ruleset and under
// ebpf-redirect), the benchmark and the scale measurement. It drives the
// product binary (ebpf-redirect) as a node agent would, and re-executes itself
// as the stand-in proxy, applications and peers. None of this is linked into
// ebpf-redirect.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
)

func main() {
	// The lab re-executes itself as its stand-in proxy and applications.
	standin.MaybeRunRole()

	ctx, _ := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	if err := newRoot().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "ebpf-redirect-lab:", err)
		os.Exit(1)
	}
}

// product is the ebpf-redirect binary the lab attaches pods with.
type product struct{ path string }

// resolve finds the binary: the flag, else ebpf-redirect beside this
// executable (where `make build` puts both), else on PATH.
func (p *product) resolve() (string, error) {
	if p.path != "" {
		if _, err := os.Stat(p.path); err != nil {
			return "", fmt.Errorf("--ebpf-redirect %s: %w", p.path, err)
		}
		return p.path, nil
	}
	if self, err := os.Executable(); err == nil {
		sib := filepath.Join(filepath.Dir(self), "ebpf-redirect")
		if _, err := os.Stat(sib); err == nil {
			return sib, nil
		}
	}
	if path, err := exec.LookPath("ebpf-redirect"); err == nil {
		return path, nil
	}
	return "", errors.New("no ebpf-redirect binary beside this one or on PATH; build it (make build) or pass --ebpf-redirect PATH")
}

func newRoot() *cobra.Command {
	p := &product{}
	root := &cobra.Command{
		Use:           "ebpf-redirect-lab",
		Short:         "The lab of ebpf-redirect: differential demo, benchmark and scale measurement on throwaway pods",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&p.path, "ebpf-redirect", "", "the ebpf-redirect binary to attach pods with (default: beside this one, else on PATH)")
	root.AddCommand(demoCmd(p), benchCmd(p), scaleCmd())
	return root
}
