package equiv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/privtest"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
)

// DemoOptions configure RunDemo.
type DemoOptions struct {
	// Binary is the ebpf-redirect executable used for attach/detach (required).
	Binary string
	// AgentExe is re-executed for the agents (it must call standin.MaybeRunRole);
	// default: the running executable.
	AgentExe string
	// ReferenceDir holds inpod-rules.v4 and inpod-routes.sh; "" uses the embedded copy.
	ReferenceDir string
	// Cases restricts the run to these case names; empty runs them all.
	Cases []string
	// ExtraAttachArgs are appended to every attach.
	ExtraAttachArgs []string
	// Verbose prints every record, not only the differing ones.
	Verbose bool
	// Context bounds the whole demo; default: background.
	Context context.Context
}

// RunDemo runs the selected cases under both backends, prints a table (case, where it
// landed under each, whether the records are the same) followed by the diff of each
// difference, cleans everything up, and fails if any case differs or does not land
// where it claims under the reference.
func RunDemo(w io.Writer, opts DemoOptions) (err error) {
	if m := privtest.Missing("iptables-restore"); m != "" {
		return fmt.Errorf("demo needs %s", m)
	}
	ctx := opts.Context
	if ctx == nil {
		ctx = context.Background()
	}
	bin := opts.Binary
	if bin == "" {
		return errors.New("demo: no ebpf-redirect binary given")
	}
	cases, err := selectCases(opts.Cases)
	if err != nil {
		return err
	}
	ref, err := NewIptables(opts.ReferenceDir)
	if err != nil {
		return err
	}
	cand := &Ebpf{Binary: bin, ExtraArgs: opts.ExtraAttachArgs}
	run, err := topology.NewRun()
	if err != nil {
		return err
	}
	defer func() {
		if cerr := run.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	runner := &Runner{Run: run, AgentExe: opts.AgentExe}

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CASE\tIPTABLES\tEBPF\tSAME?")
	var details strings.Builder
	var bad []string
	var known, skipped []string
	for _, c := range cases {
		if why := c.Unavailable(); why != "" {
			fmt.Fprintf(tw, "%s\t-\t-\tskipped\n", c.Name)
			fmt.Fprintf(&details, "\n## %s: skipped: %s\n", c.Name, why)
			skipped = append(skipped, c.Name)
			continue
		}
		o, rerr := runner.RunPair(ctx, c, ref, cand)
		if rerr != nil {
			fmt.Fprintf(tw, "%s\t-\t-\tERROR\n", c.Name)
			fmt.Fprintf(&details, "\n## %s: %v\n", c.Name, rerr)
			bad = append(bad, c.Name)
			continue
		}
		same := "yes"
		switch {
		case o.Diff != "" && c.KnownDifference != "":
			same = "no: known difference"
		case o.Diff != "":
			same = "NO"
		}
		refLanding := o.Reference.Landing()
		if o.ExpectErr != nil {
			refLanding += " (!expected " + c.Expect + ")"
			same += ", unexpected reference"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Name, refLanding, o.Candidate.Landing(), same)
		if perr := o.Problem(); perr != nil {
			bad = append(bad, c.Name)
			fmt.Fprintf(&details, "\n## %s: %s\n%v\n", c.Name, c.Description, perr)
		} else if c.KnownDifference != "" {
			known = append(known, c.Name)
			fmt.Fprintf(&details, "\n## %s (known difference): %s\nwhy: %s\n%s", c.Name, c.Description, c.KnownDifference, o.Diff)
		} else if opts.Verbose {
			fmt.Fprintf(&details, "\n## %s: %s\n%s\n", c.Name, c.Description, o.Reference)
		}
	}
	tw.Flush()
	io.WriteString(w, details.String())
	if len(bad) > 0 {
		return fmt.Errorf("%d of %d cases differ or failed: %s", len(bad), len(cases), strings.Join(bad, ", "))
	}
	ran := len(cases) - len(skipped)
	switch {
	case len(known) == 0 && len(skipped) == 0:
		fmt.Fprintf(w, "\nall %d cases equivalent\n", ran)
	default:
		fmt.Fprintf(w, "\n%d of %d cases equivalent; known differences: %s; skipped: %s\n",
			ran-len(known), ran, orNone(known), orNone(skipped))
	}
	return nil
}

func selectCases(names []string) ([]Case, error) {
	if len(names) == 0 {
		return AllCases(), nil
	}
	var out []Case
	for _, n := range names {
		c, ok := CaseByName(n)
		if !ok {
			return nil, fmt.Errorf("no case named %q", n)
		}
		out = append(out, c)
	}
	return out, nil
}

func orNone(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}
