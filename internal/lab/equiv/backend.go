// Package equiv is the differential test suite of ebpf-redirect: traffic cases, each run
// in fresh pods under the reference iptables ruleset and under ebpf-redirect, the
// records of what every party observed, their comparison and a report.
//
// A case (cases.go) says which proxy listeners and servers exist, who connects where,
// and where the connection lands under the reference (Expect). Runner.RunCase builds a
// pod (internal/topology), applies a Backend, starts the agents (internal/standin),
// makes the connection and collects a Record. Records are compared as canonical text in
// which only ephemeral ports are relabelled (eph1, eph2... in order of appearance).
//
// Entry points: test/equivalence_test.go (go test ./test/ -run 'TestEquivalence/^NAME$'
// for one case, TestEquivIptables for the reference alone) and RunDemo, behind
// `ebpf-redirect demo`.
package equiv

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/reference"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
)

// Backend applies a redirection mechanism to a pod, and removes it.
type Backend interface {
	Name() string
	Apply(ctx context.Context, run *topology.Run, pod *topology.Pod) error
	Remove(ctx context.Context, run *topology.Run, pod *topology.Pod) error
}

// Iptables is the reference: the in-pod rulesets (IPv4 and its IPv6 twin, as a
// default Istio installation writes both) loaded with iptables-restore and
// ip6tables-restore, and the policy route scripts, all run inside the pod's netns.
type Iptables struct {
	Rules   []byte // inpod-rules.v4
	Rules6  []byte // inpod-rules.v6; nil: IPv4 only
	Routes  []byte // inpod-routes.sh
	Routes6 []byte // inpod-routes6.sh
	// Label, if set, is the backend's name in records ("iptables" otherwise).
	Label string
}

// Reference file names of one variant of the rulesets: "" is the plain one
// (inpod-rules.v4/.v6), others ("dns", "bypass-inbound"...) inpod-rules-<variant>.
func rulesFiles(variant string) (v4, v6 string) {
	if variant == "" {
		return "inpod-rules.v4", "inpod-rules.v6"
	}
	return "inpod-rules-" + variant + ".v4", "inpod-rules-" + variant + ".v6"
}

// NewIptables reads the plain rulesets and the routes from dir, or uses the
// embedded copy when dir is "".
func NewIptables(dir string) (*Iptables, error) {
	return NewIptablesVariant(dir, "")
}

// NewIptablesVariant reads one variant of the rulesets (see rulesFiles).
func NewIptablesVariant(dir, variant string) (*Iptables, error) {
	v4, v6 := rulesFiles(variant)
	read := func(name string) ([]byte, error) {
		if dir == "" {
			return reference.File(name), nil
		}
		return os.ReadFile(filepath.Join(dir, name))
	}
	b := &Iptables{}
	for _, f := range []struct {
		name string
		to   *[]byte
	}{{v4, &b.Rules}, {v6, &b.Rules6}, {"inpod-routes.sh", &b.Routes}, {"inpod-routes6.sh", &b.Routes6}} {
		data, err := read(f.name)
		if err != nil {
			return nil, err
		}
		*f.to = data
	}
	return b, nil
}

func (b *Iptables) Name() string {
	if b.Label != "" {
		return b.Label
	}
	return "iptables"
}

func (b *Iptables) Apply(ctx context.Context, _ *topology.Run, pod *topology.Pod) error {
	if err := runIn(ctx, b.Rules, "ip", "netns", "exec", pod.NetNS, "iptables-restore"); err != nil {
		return err
	}
	if b.Rules6 != nil {
		if err := runIn(ctx, b.Rules6, "ip", "netns", "exec", pod.NetNS, "ip6tables-restore"); err != nil {
			return err
		}
	}
	if err := runIn(ctx, b.Routes, "ip", "netns", "exec", pod.NetNS, "sh", "-s"); err != nil {
		return err
	}
	if b.Rules6 != nil {
		return runIn(ctx, b.Routes6, "ip", "netns", "exec", pod.NetNS, "sh", "-s")
	}
	return nil
}

// Remove takes the reference out of the pod's netns as a node agent un-enrolling the
// pod does: every rule the rulesets appended is deleted one by one, then their own
// chains; the built-in chains stay. Each "ip rule add"/"ip route add" of the routes
// scripts becomes a "del". Established connections keep their conntrack entries and so
// their NAT. (Flushing whole tables instead was seen, with iptables-nft, to stop the
// translation of established connections: their next segments went to the original
// destination untranslated.) Removing twice is harmless.
func (b *Iptables) Remove(ctx context.Context, _ *topology.Run, pod *topology.Pod) error {
	if _, err := os.Stat(pod.NetNSPath()); err != nil {
		return nil // the netns is gone, and the rules with it
	}
	var undo strings.Builder
	undoRules(&undo, "iptables", b.Rules)
	undoRoutes(&undo, b.Routes)
	if b.Rules6 != nil {
		undoRules(&undo, "ip6tables", b.Rules6)
		undoRoutes(&undo, b.Routes6)
	}
	return runIn(ctx, []byte(undo.String()), "ip", "netns", "exec", pod.NetNS, "sh", "-s")
}

func undoRules(undo *strings.Builder, tool string, rules []byte) {
	table := ""
	var chains []string
	for _, line := range strings.Split(string(rules), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "*"):
			table = line[1:]
		case strings.HasPrefix(line, ":") && strings.Contains(line, " - "):
			chains = append(chains, fmt.Sprintf("-t %s -X %s", table, strings.Fields(line[1:])[0]))
		case strings.HasPrefix(line, "-A "):
			// Best effort: already removed is fine.
			fmt.Fprintf(undo, "%s -w -t %s -D %s 2>/dev/null || true\n", tool, table, line[3:])
		}
	}
	for _, c := range chains {
		fmt.Fprintf(undo, "%s -w %s 2>/dev/null || true\n", tool, c)
	}
}

func undoRoutes(undo *strings.Builder, routes []byte) {
	for _, line := range strings.Split(string(routes), "\n") {
		line = strings.TrimSpace(line)
		for _, obj := range []string{"ip rule add ", "ip route add ", "ip -6 rule add ", "ip -6 route add "} {
			if rest, ok := strings.CutPrefix(line, obj); ok {
				// Best effort: already removed is fine.
				fmt.Fprintf(undo, "%s %s 2>/dev/null || true\n", strings.Replace(obj, " add ", " del", 1), rest)
			}
		}
	}
}

// Reconciler is a backend that must be told when a pod's interfaces or addresses
// changed after it was applied (ebpf-redirect's reconcile, which a node agent runs
// after changing a pod, and `serve` periodically). The reference needs nothing: its
// rules cover every interface.
type Reconciler interface {
	Reconcile(ctx context.Context, run *topology.Run, pod *topology.Pod) error
}

// Ebpf runs the ebpf-redirect CLI: `attach` before the case, `detach` after it.
type Ebpf struct {
	Binary    string
	ExtraArgs []string // appended to attach (config flags, or a deliberate mutation)
	Env       []string // added to attach's environment
}

func (b *Ebpf) Name() string { return "ebpf" }

// AttachArgs is the attach command line for a pod (without the binary).
func (b *Ebpf) AttachArgs(run *topology.Run, pod *topology.Pod) []string {
	args := []string{"attach",
		"--pod-id", pod.ID,
		"--netns", pod.NetNSPath(),
		"--cgroup", pod.PodCgroup,
		"--proxy-cgroup", pod.ProxyCgrp,
		"--bpffs", run.BPFFS,
	}
	return append(args, b.ExtraArgs...)
}

func (b *Ebpf) Apply(ctx context.Context, run *topology.Run, pod *topology.Pod) error {
	return runEnv(ctx, b.Env, nil, b.Binary, b.AttachArgs(run, pod)...)
}

// Reconcile runs `ebpf-redirect reconcile`, which refreshes every healthy pod.
func (b *Ebpf) Reconcile(ctx context.Context, run *topology.Run, _ *topology.Pod) error {
	return runEnv(ctx, b.Env, nil, b.Binary, "reconcile", "--bpffs", run.BPFFS)
}

func (b *Ebpf) Remove(ctx context.Context, run *topology.Run, pod *topology.Pod) error {
	return runIn(ctx, nil, b.Binary, "detach", "--pod-id", pod.ID, "--bpffs", run.BPFFS)
}

// runIn runs a command with stdin, bounded in time, and reports its output on failure.
func runIn(ctx context.Context, stdin []byte, name string, args ...string) error {
	return runEnv(ctx, nil, stdin, name, args...)
}

// runEnv is runIn with variables added to the environment.
func runEnv(ctx context.Context, env []string, stdin []byte, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stdin = bytes.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %v: %w: %s", name, args, err, bytes.TrimSpace(out))
	}
	return nil
}
