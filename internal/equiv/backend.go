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
	"time"

	"github.com/ebpf-redirect/ebpf-redirect/internal/reference"
	"github.com/ebpf-redirect/ebpf-redirect/internal/topology"
)

// Backend applies a redirection mechanism to a pod, and removes it.
type Backend interface {
	Name() string
	Apply(ctx context.Context, run *topology.Run, pod *topology.Pod) error
	Remove(ctx context.Context, run *topology.Run, pod *topology.Pod) error
}

// Iptables is the reference: the in-pod ruleset loaded with iptables-restore and the
// policy route script, both run inside the pod's netns.
type Iptables struct {
	Rules  []byte
	Routes []byte
}

// NewIptables reads inpod-rules.v4 and inpod-routes.sh from dir, or uses the embedded
// copy when dir is "".
func NewIptables(dir string) (*Iptables, error) {
	if dir == "" {
		return &Iptables{Rules: reference.Rules, Routes: reference.Routes}, nil
	}
	rules, err := os.ReadFile(filepath.Join(dir, "inpod-rules.v4"))
	if err != nil {
		return nil, err
	}
	routes, err := os.ReadFile(filepath.Join(dir, "inpod-routes.sh"))
	if err != nil {
		return nil, err
	}
	return &Iptables{Rules: rules, Routes: routes}, nil
}

func (b *Iptables) Name() string { return "iptables" }

func (b *Iptables) Apply(ctx context.Context, _ *topology.Run, pod *topology.Pod) error {
	if err := runIn(ctx, b.Rules, "ip", "netns", "exec", pod.NetNS, "iptables-restore"); err != nil {
		return err
	}
	return runIn(ctx, b.Routes, "ip", "netns", "exec", pod.NetNS, "sh", "-s")
}

// Remove does nothing: the rules and routes die with the pod's netns.
func (b *Iptables) Remove(context.Context, *topology.Run, *topology.Pod) error { return nil }

// Ebpf runs the ebpf-redirect CLI: `attach` before the case, `detach` after it.
type Ebpf struct {
	Binary    string
	ExtraArgs []string // appended to attach (config flags, or a deliberate mutation)
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
	return runIn(ctx, nil, b.Binary, b.AttachArgs(run, pod)...)
}

func (b *Ebpf) Remove(ctx context.Context, run *topology.Run, pod *topology.Pod) error {
	return runIn(ctx, nil, b.Binary, "detach", "--pod-id", pod.ID, "--bpffs", run.BPFFS)
}

// runIn runs a command with stdin, bounded in time, and reports its output on failure.
func runIn(ctx context.Context, stdin []byte, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = bytes.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %v: %w: %s", name, args, err, bytes.TrimSpace(out))
	}
	return nil
}
