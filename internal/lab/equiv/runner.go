package equiv

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
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
// connection made, and every party's events collected once nothing is in flight. The
// case's knobs change the order (AttachLate), add a second link (AddInterface), start
// the client elsewhere (ClientMovedApp...) or remove the backend while the connection
// is open (RemoveWhileOpen).
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
	var agents []*standin.Agent
	applied, removed := false, false
	defer func() {
		// Agents first: the backend's removal may want quiet sockets.
		for _, a := range agents {
			_ = a.Close()
		}
		if !applied || removed {
			return
		}
		// A detached pod must still be removable with a fresh context.
		rctx, rcancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer rcancel()
		if rerr := b.Remove(rctx, r.Run, pod); rerr != nil {
			err = errors.Join(err, fmt.Errorf("%s remove: %w", b.Name(), rerr))
		}
	}()
	apply := func() error {
		if err := b.Apply(ctx, r.Run, pod); err != nil {
			return fmt.Errorf("%s apply: %w", b.Name(), err)
		}
		applied = true
		return nil
	}
	if !c.AttachLate {
		if err := apply(); err != nil {
			return nil, err
		}
	}
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
	client := map[string]*standin.Agent{ClientApp: app, ClientPeer: peer, ClientProxy: proxy}[c.Client]
	var moveTo string // the cgroup the client moves into once the backend is applied
	switch c.Client {
	case ClientMovedApp, ClientNetnsApp, ClientSubCgroupApp:
		// Started in the pod's netns, in a cgroup that is neither the pod's nor
		// the proxy's.
		staging, err := pod.AddCgroup("staging")
		if err != nil {
			return nil, err
		}
		if client, err = start(standin.RoleApp, pod.NetNSPath(), staging); err != nil {
			return nil, err
		}
		switch c.Client {
		case ClientMovedApp:
			moveTo = pod.PodCgroup
		case ClientSubCgroupApp:
			if moveTo, err = pod.AddCgroup(filepath.Join(filepath.Base(pod.PodCgroup), "sub")); err != nil {
				return nil, err
			}
		}
	}
	if client == nil {
		return nil, fmt.Errorf("case %s: unknown client %q", c.Name, c.Client)
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
	if c.Wire {
		// The proxy agent and R sit in the two netns: the pod's lo, R's end of the link.
		if err := proxy.Sniff(ctx, "lo"); err != nil {
			return nil, err
		}
		if err := peer.Sniff(ctx, topology.PeerIfName); err != nil {
			return nil, err
		}
	}
	if c.AttachLate {
		if err := apply(); err != nil {
			return nil, err
		}
	}
	if c.AddInterface {
		if err := pod.AddSecondInterface(); err != nil {
			return nil, err
		}
	}
	if rc, ok := b.(Reconciler); ok && c.Reconcile {
		if err := rc.Reconcile(ctx, r.Run, pod); err != nil {
			return nil, fmt.Errorf("%s reconcile: %w", b.Name(), err)
		}
	}
	if moveTo != "" {
		if err := topology.MoveToCgroup(client.Pid, moveTo); err != nil {
			return nil, err
		}
	}
	spec := c.dialSpec()
	var res standin.DialResult
	var after, meanwhile *standin.DialResult
	switch {
	case c.Meanwhile != nil:
		if res, meanwhile, err = r.dialMeanwhile(ctx, c, client, spec); err != nil {
			return nil, err
		}
	case !c.RemoveWhileOpen:
		if res, err = client.Dial(ctx, spec); err != nil {
			return nil, err
		}
	default:
		// The server the connection ends at: the app's for a connection
		// into the pod, R's for one out of it.
		server := app
		if client != peer {
			server = peer
		}
		if res, after, err = r.removeWhileOpen(ctx, c, b, pod, client, server, spec); err != nil {
			return nil, err
		}
		removed = true
	}
	collectFor := 10 * time.Second
	if c.RemoveWhileOpen {
		// A connection broken by the removal may stay open on one side until
		// its time-outs: what is still open is part of the record.
		collectFor = 2 * time.Second
	}
	cctx, ccancel := context.WithTimeout(ctx, collectFor)
	defer ccancel()
	evs, err := standin.Collect(cctx, proxy, app, peer)
	if err != nil && !(c.RemoveWhileOpen && cctx.Err() != nil) {
		return nil, err
	}
	rec = &Record{Case: c.Name, Backend: b.Name(), Client: res, Meanwhile: meanwhile, After: after, Fixed: c.FixedPorts()}
	for _, a := range []*standin.Agent{proxy, app, peer} {
		rec.Proxy = append(rec.Proxy, evs[a].Proxy...)
		rec.Servers = append(rec.Servers, evs[a].Server...)
		for _, w := range evs[a].Wire {
			where := "R"
			if a == proxy {
				where = "pod"
			}
			rec.Wire = append(rec.Wire, fmt.Sprintf("%s %s: SYN %s > %s", where, w.Iface, w.Src, w.Dst))
		}
		if n := evs[a].InFlight; n > 0 {
			if rec.StillOpen == nil {
				rec.StillOpen = map[string]int{}
			}
			rec.StillOpen[a.Role] = n
		}
	}
	return rec, nil
}

// gatedDial starts the dial, which holds after its request line, and returns once
// it holds there. finish lets it go on and returns its result; call it in every case.
func gatedDial(ctx context.Context, client *standin.Agent, spec standin.DialSpec) (finish func() (standin.DialResult, error), err error) {
	type result struct {
		res standin.DialResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		res, err := client.Dial(ctx, spec)
		done <- result{res, err}
	}()
	finish = func() (standin.DialResult, error) {
		rerr := client.ReleaseGate(context.Background(), spec.Gate)
		r := <-done
		return r.res, errors.Join(r.err, rerr)
	}
	return finish, client.WaitGate(ctx, spec.Gate)
}

// dialMeanwhile holds the case's connection open after its request line, makes the
// Meanwhile connection, then lets the first one finish.
func (r *Runner) dialMeanwhile(ctx context.Context, c Case, client *standin.Agent, spec standin.DialSpec) (standin.DialResult, *standin.DialResult, error) {
	spec.Gate = "meanwhile-" + c.Name
	second := *c.Meanwhile
	if second.Proto == "" {
		second.Proto = "tcp"
	}
	if second.Token == "" {
		second.Token = c.Name + "-meanwhile"
	}
	finish, err := gatedDial(ctx, client, spec)
	var res standin.DialResult
	if err == nil {
		res, err = client.Dial(ctx, second)
	}
	first, ferr := finish()
	return first, &res, errors.Join(err, ferr)
}

// removeWhileOpen makes the case's connection hold after its request line, removes
// the backend, lets the connection finish, and then makes the same connection again,
// which no capture should see any more.
func (r *Runner) removeWhileOpen(ctx context.Context, c Case, b Backend, pod *topology.Pod, client *standin.Agent, server *standin.Agent, spec standin.DialSpec) (standin.DialResult, *standin.DialResult, error) {
	spec.Gate = "open-" + c.Name
	finish, err := gatedDial(ctx, client, spec)
	if err == nil {
		// The connection is open end to end: its server holds it.
		err = server.WaitInFlight(ctx, 1)
	}
	if err == nil {
		if err = b.Remove(ctx, r.Run, pod); err != nil {
			err = fmt.Errorf("%s remove with a connection open: %w", b.Name(), err)
		}
	}
	first, ferr := finish()
	if err = errors.Join(err, ferr); err != nil {
		return standin.DialResult{}, nil, err
	}
	spec.Gate = ""
	spec.Token += "-after"
	again, err := client.Dial(ctx, spec)
	if err != nil {
		return standin.DialResult{}, nil, err
	}
	return first, &again, nil
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

// Problem returns nil when the suite accepts the outcome: the reference landed where
// the case expects, and the records are the same or, for a case with a
// KnownDifference, differ with the candidate landing where EbpfExpect says.
func (o *Outcome) Problem() error {
	var errs []error
	if o.ExpectErr != nil {
		errs = append(errs, fmt.Errorf("reference: %w", o.ExpectErr))
	}
	c := o.Case
	switch {
	case c.KnownDifference == "" && o.Diff != "":
		errs = append(errs, fmt.Errorf("records differ:\n%s", o.Diff))
	case c.KnownDifference != "" && o.Diff == "":
		errs = append(errs, fmt.Errorf("the known difference is gone (%s): both backends recorded the same; drop KnownDifference from the case", c.KnownDifference))
	case c.KnownDifference != "" && o.Candidate.Landing() != c.EbpfExpect:
		errs = append(errs, fmt.Errorf("known difference, but ebpf-redirect landed on %q, the case expects %q:\n%s", o.Candidate.Landing(), c.EbpfExpect, o.Diff))
	}
	return errors.Join(errs...)
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
