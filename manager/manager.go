// Package manager is the Go API of ebpf-redirect for node agents (istio-cni
// and the like): capture a pod's traffic with eBPF the way Istio ambient's
// in-pod iptables ruleset does, release it, and keep the node's pods in the
// state the agent wants across restarts, crashes and upgrades.
//
// The programs are loaded once per node and pinned on bpffs; every pod adds
// links and map entries only, so attaching the 1000th pod costs what the 2nd
// did. All state lives in the pins: a Manager holds nothing that a new
// process cannot adopt, and two processes (or goroutines) may use the same
// bpffs directory at once; every operation takes an exclusive lock on it.
package manager

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/redirect"
	"github.com/ebpf-redirect/ebpf-redirect/internal/rules"
)

// Config is the ruleset's values: ports, marks, probe address, policy route.
type Config = config.Config

// DefaultConfig returns the reference ruleset's values.
func DefaultConfig() Config { return config.Default() }

// Pod names what to capture: an id unique on the node (letters, digits, '.',
// '_', '-'; at most 63 bytes), the pod's netns file, its cgroup v2 directory,
// and the proxy's cgroup v2 directory (where SO_ORIGINAL_DST is answered).
type Pod = redirect.Pod

// PodStatus is an attached pod's record and health ("healthy", "defunct" or
// "attaching").
type PodStatus = redirect.Status

// Report says what Reconcile did.
type Report = redirect.Report

// Query and Decision are the input and output of Explain.
type (
	Query    = rules.Query
	Decision = rules.Decision
)

// Errors to test with errors.Is.
var (
	ErrAlreadyAttached = redirect.ErrAlreadyAttached
	ErrNotAttached     = redirect.ErrNotAttached
)

// Options configure a Manager.
type Options struct {
	// BPFFS is a directory on a bpffs mount for the pins; default
	// /sys/fs/bpf/ebpf-redirect.
	BPFFS string
	// Config defaults to DefaultConfig(). Every pod of a node shares one.
	Config *Config
	// TCMode: "auto" (tcx where the kernel has it, else legacy cls_bpf),
	// "tcx" or "legacy".
	TCMode string
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Manager attaches and detaches pods. It is safe for concurrent use.
type Manager struct {
	o redirect.Options
}

// New checks the options and the bpffs directory, and adopts whatever is
// pinned there: pods attached by an earlier process stay attached, and pinned
// programs of an older version are upgraded in place on the first attach.
func New(o Options) (*Manager, error) {
	cfg := config.Default()
	if o.Config != nil {
		cfg = *o.Config
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	mode, err := redirect.ParseTCMode(o.TCMode)
	if err != nil {
		return nil, err
	}
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	m := &Manager{o: redirect.Options{Root: o.BPFFS, Config: cfg, TCMode: mode, Log: log}}
	if err := redirect.Check(m.o.Root); err != nil { // bpffs, the lock, the metadata maps
		return nil, err
	}
	return m, nil
}

// AttachResult says whether AttachPod changed anything.
type AttachResult = redirect.Result

// AttachPod captures a pod's traffic. Attaching an attached pod with the same
// netns and cgroups is a no-op (AlreadyAttached); with others it is an error.
// On error nothing of the pod is left attached and no other pod is touched.
func (m *Manager) AttachPod(ctx context.Context, p Pod) (AttachResult, error) {
	return redirect.Attach(ctx, m.o, p)
}

// DetachPod removes everything AttachPod made for the pod. It returns an
// error wrapping ErrNotAttached for an unknown pod.
func (m *Manager) DetachPod(ctx context.Context, id string) error {
	return redirect.Detach(ctx, m.o, id)
}

// Reconcile makes the attached pods exactly live: the others are detached,
// missing ones attached, broken or half-attached ones redone. Call it after a
// restart with the agent's view of the node. With live nil it only removes
// pods whose netns or cgroup is gone and attaches that never finished.
func (m *Manager) Reconcile(ctx context.Context, live []Pod) (Report, error) {
	return redirect.Reconcile(ctx, m.o, live)
}

// Pods lists the attached pods with their health, sorted by id.
func (m *Manager) Pods() ([]PodStatus, error) {
	ps, err := redirect.List(m.o)
	sort.Slice(ps, func(i, j int) bool { return ps[i].ID < ps[j].ID })
	return ps, err
}

// RuleCount is how many connections one rule of the reference took.
type RuleCount struct {
	Rule        string `json:"rule"`  // short name, e.g. "out-redirect"
	Chain       string `json:"chain"` // e.g. "nat ISTIO_OUTPUT 4"
	Text        string `json:"text"`  // the reference's line
	Connections uint64 `json:"connections"`
}

// Stats returns the pod's per-rule counters, in the reference's order: the
// eBPF twin of iptables-save -c.
func (m *Manager) Stats(id string) ([]RuleCount, error) {
	c, err := redirect.Stats(m.o, id)
	if err != nil {
		return nil, err
	}
	return ruleCounts(c), nil
}

// StatsAll returns every pod's counters.
func (m *Manager) StatsAll() (map[string][]RuleCount, error) {
	all, err := redirect.StatsAll(m.o)
	if err != nil {
		return nil, err
	}
	out := map[string][]RuleCount{}
	for id, c := range all {
		out[id] = ruleCounts(c)
	}
	return out, nil
}

func ruleCounts(c redirect.Counts) []RuleCount {
	var out []RuleCount
	for _, i := range rules.All() {
		out = append(out, RuleCount{Rule: i.Name, Chain: i.Chain, Text: i.Text, Connections: c[i.Rule]})
	}
	return out
}

// Explain says which rule decides a connection of the pod and what happens
// to it, from the live config and the pod's live map entries.
func (m *Manager) Explain(id string, q Query) (Decision, error) {
	return redirect.Explain(m.o, id, q)
}

// Refresh takes in the pod's interfaces and addresses as they are now: an
// interface added after attach gets the tc programs (until then the pod's
// ingress guard refuses new connections arriving on it). Reconcile refreshes
// every healthy pod; it reports whether anything changed.
func (m *Manager) Refresh(id string) (bool, error) {
	return redirect.Refresh(m.o, id)
}

// Upgrade swaps this binary's programs into every attached pod now (it also
// happens on the first attach after a version change); with force, even if
// the pinned programs are of the same version.
func (m *Manager) Upgrade(force bool) error {
	return redirect.Upgrade(m.o, force)
}

// Close releases the Manager. Attached pods stay attached.
func (m *Manager) Close() error {
	if m == nil {
		return errors.New("nil manager")
	}
	return nil
}
