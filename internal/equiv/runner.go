package equiv

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/ebpf-redirect/ebpf-redirect/internal/standin"
	"github.com/ebpf-redirect/ebpf-redirect/internal/topology"
)

// Runner runs cases in fresh pods of one topology.Run.
type Runner struct {
	Run *topology.Run
	// AgentExe is the binary re-executed for the agents; it must call
	// standin.MaybeRunRole first thing. Default: os.Executable().
	AgentExe string
}

// RunCase runs one case under one backend in a fresh pod, which it tears down
// afterwards: the pod is built, the backend applied, the agents started (proxy in the
// proxy cgroup, app in the pod cgroup, R in its own netns), the servers opened, the
// connection made, and every party's events collected once nothing is in flight.
func (r *Runner) RunCase(ctx context.Context, c Case, b Backend) (rec *Record, err error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	pod, err := r.Run.NewPod()
	if err != nil {
		return nil, fmt.Errorf("pod: %w", err)
	}
	defer func() {
		if cerr := pod.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("pod teardown: %w", cerr))
		}
	}()
	if err := b.Apply(ctx, r.Run, pod); err != nil {
		return nil, fmt.Errorf("%s apply: %w", b.Name(), err)
	}
	var agents []*standin.Agent
	defer func() {
		// Agents first: the backend's removal may want quiet sockets.
		for _, a := range agents {
			_ = a.Close()
		}
		// A detached pod must still be removable with a fresh context.
		rctx, rcancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer rcancel()
		if rerr := b.Remove(rctx, r.Run, pod); rerr != nil {
			err = errors.Join(err, fmt.Errorf("%s remove: %w", b.Name(), rerr))
		}
	}()
	start := func(role, netns, cgroup string) (*standin.Agent, error) {
		a, err := standin.Start(ctx, standin.StartOptions{Role: role, NetNSPath: netns, CgroupDir: cgroup, Exe: r.AgentExe})
		if err == nil {
			agents = append(agents, a)
		}
		return a, err
	}
	proxy, err := start(standin.RoleProxy, pod.NetNSPath(), pod.ProxyCgrp)
	if err != nil {
		return nil, err
	}
	app, err := start(standin.RoleApp, pod.NetNSPath(), pod.PodCgroup)
	if err != nil {
		return nil, err
	}
	peer, err := start(standin.RolePeer, pod.PeerNetNSPath(), pod.PeerCgroup)
	if err != nil {
		return nil, err
	}
	if err := proxy.StartProxy(ctx, c.Proxy); err != nil {
		return nil, err
	}
	for _, l := range c.App {
		if _, err := app.Listen(ctx, l); err != nil {
			return nil, err
		}
	}
	for _, l := range c.Peer {
		if _, err := peer.Listen(ctx, l); err != nil {
			return nil, err
		}
	}
	client := map[string]*standin.Agent{ClientApp: app, ClientPeer: peer, ClientProxy: proxy}[c.Client]
	if client == nil {
		return nil, fmt.Errorf("case %s: unknown client %q", c.Name, c.Client)
	}
	res, err := client.Dial(ctx, c.dialSpec())
	if err != nil {
		return nil, err
	}
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	defer ccancel()
	evs, err := standin.Collect(cctx, proxy, app, peer)
	if err != nil {
		return nil, err
	}
	rec = &Record{Case: c.Name, Backend: b.Name(), Client: res, Fixed: c.FixedPorts()}
	for _, a := range []*standin.Agent{proxy, app, peer} {
		rec.Proxy = append(rec.Proxy, evs[a].Proxy...)
		rec.Servers = append(rec.Servers, evs[a].Server...)
	}
	return rec, nil
}

// Outcome of one case under both backends.
type Outcome struct {
	Case      Case
	Reference *Record // iptables
	Candidate *Record // ebpf
	// Diff is "" when the records are equivalent.
	Diff string
	// ExpectErr is set when the reference did not land where the case says.
	ExpectErr error
}

// RunPair runs a case under the reference and under the candidate, each in its own
// fresh pod, and compares.
func (r *Runner) RunPair(ctx context.Context, c Case, ref, cand Backend) (*Outcome, error) {
	a, err := r.RunCase(ctx, c, ref)
	if err != nil {
		return nil, fmt.Errorf("%s under %s: %w", c.Name, ref.Name(), err)
	}
	b, err := r.RunCase(ctx, c, cand)
	if err != nil {
		return nil, fmt.Errorf("%s under %s: %w", c.Name, cand.Name(), err)
	}
	return &Outcome{Case: c, Reference: a, Candidate: b, Diff: Compare(a, b), ExpectErr: CheckExpect(c, a)}, nil
}
