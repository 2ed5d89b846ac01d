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
	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
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
	// ErrNothingPinned: Upgrade found nothing pinned to upgrade.
	ErrNothingPinned = redirect.ErrNothingPinned
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
	// MountBPFFS mounts a bpffs at /sys/fs/bpf when BPFFS is the default and
	// none is mounted there (a fresh machine), as node agents do. An explicit
	// BPFFS that is not on a bpffs is always refused.
	MountBPFFS bool
	// BeforeStep, if set, runs before each step of an attach (named by
	// redirect.AttachSteps: record, maps, route, sysctl, tc, cgroup, proxy,
	// done); an error fails the attach there, which then unwinds. A seam for
	// fault tests: node agents leave it nil.
	BeforeStep func(step string) error
}

// Manager attaches and detaches pods. It is safe for concurrent use.
type Manager struct {
	o redirect.Options
}

// New checks the options (the config is validated here, once) and the bpffs
// directory, and adopts whatever is pinned there: pods attached by an earlier
// process stay attached and keep their programs until Upgrade.
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
	m := &Manager{o: redirect.Options{Root: o.BPFFS, Config: cfg, TCMode: mode, Log: log, MountBPFFS: o.MountBPFFS, BeforeStep: o.BeforeStep}}
	if err := redirect.Check(m.o); err != nil { // bpffs, the lock, the metadata maps
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
	Rule        string `json:"rule"`   // short name, e.g. "out-redirect"
	Family      string `json:"family"` // "ipv4" (the iptables ruleset) or "ipv6" (ip6tables)
	Chain       string `json:"chain"`  // e.g. "nat ISTIO_OUTPUT 4"
	Text        string `json:"text"`   // the reference's line, with the node's values
	Connections uint64 `json:"connections"`
}

// Stats returns the pod's per-rule counters, in the reference's order: the
// eBPF twin of iptables-save -c.
func (m *Manager) Stats(id string) ([]RuleCount, error) {
	c, cfg, err := redirect.Stats(m.o, id)
	if err != nil {
		return nil, err
	}
	return ruleCounts(cfg, c), nil
}

// StatsAll returns every pod's counters.
func (m *Manager) StatsAll() (map[string][]RuleCount, error) {
	all, cfg, err := redirect.StatsAll(m.o)
	if err != nil {
		return nil, err
	}
	out := map[string][]RuleCount{}
	for id, c := range all {
		out[id] = ruleCounts(cfg, c)
	}
	return out, nil
}

// ruleCounts renders the rules with the config the datapath runs with.
func ruleCounts(cfg config.Config, c redirect.Counts) []RuleCount {
	var out []RuleCount
	for _, i := range rules.All(cfg) {
		f := datapath.FamilyV4
		if i.Family == rules.IPv6 {
			f = datapath.FamilyV6
		}
		out = append(out, RuleCount{Rule: i.Name, Family: i.Family, Chain: i.Chain, Text: i.Text, Connections: c[datapath.Count{Rule: i.Rule, Family: f}]})
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

// UpgradeReport says what Upgrade did.
type UpgradeReport = redirect.UpgradeReport

// Upgrade swaps this binary's programs into every attached pod (atomic link
// updates; pinned maps, and so flows and counters, carry over), and moves the
// pins to this binary's schema. Nothing else ever does: pinned programs of
// another version are used as they are until Upgrade is called. Without
// force it does nothing when the pinned programs are this binary's. It
// refuses, changing nothing, pins of a newer schema and a new object that
// changes the layout of a pinned map.
func (m *Manager) Upgrade(ctx context.Context, force bool) (UpgradeReport, error) {
	return redirect.Upgrade(ctx, m.o, force)
}

// Close releases the Manager. Attached pods stay attached.
func (m *Manager) Close() error {
	if m == nil {
		return errors.New("nil manager")
	}
	return nil
}
