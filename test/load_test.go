package test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/equiv"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
	"github.com/ebpf-redirect/ebpf-redirect/internal/redirect"
)

// Load and leaks: many connections at once and many in a row through the
// redirect, each carrying its own token end to end, to servers on several
// ports, so that a connection handed another's original destination (or
// another's reply) is seen. Everything stays inside the test's namespaces.

// loadPorts is how many servers each side runs: connection i goes to port i%loadPorts.
const loadPorts = 16

// loadProxies is how many proxy processes share the listeners.
const loadProxies = 3

// loadRig is a pod attached with ebpf-redirect, its proxy, an app and R,
// each side with loadPorts quiet servers.
type loadRig struct {
	run               *topology.Run
	pod               *topology.Pod
	proxies           []*standin.Agent // sharing the listeners (SO_REUSEPORT), as ztunnel's workers do
	app, peer         *standin.Agent
	cookie            uint64
	outDsts, outNames []string // R's servers, reached from the app
	inDsts, inNames   []string // the app's servers, reached from R
	outDsts6, inDsts6 []string // the same over IPv6
}

// newLoadRig builds the rig; args go to the attach (map sizes).
func newLoadRig(t *testing.T, args []string) *loadRig {
	t.Helper()
	r := lifecycleRun(t)
	p := newPod(t, r)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Room for tens of thousands of connections: ports, listen backlogs, and
	// reuse of ports in TIME_WAIT. These are per-netns settings.
	for _, path := range []string{p.NetNSPath(), p.PeerNetNSPath()} {
		ns, err := podnet.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range map[string]string{
			"net.ipv4.ip_local_port_range": "1024 65000",
			"net.ipv4.tcp_tw_reuse":        "1",
			"net.core.somaxconn":           "16384",
			"net.ipv4.tcp_max_syn_backlog": "16384",
		} {
			if _, err := podnet.SetSysctl(ns, k, v); err != nil {
				ns.Close()
				t.Fatal(err)
			}
		}
		ns.Close()
	}
	b := &equiv.Ebpf{Binary: ebpfBinary(t), ExtraArgs: args}
	if err := b.Apply(ctx, r, p); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := b.Remove(context.Background(), r, p); err != nil {
			t.Errorf("detach: %v", err)
		}
	})
	rig := &loadRig{run: r, pod: p}
	start := func(role, ns, cg string) *standin.Agent {
		return standin.MustStart(t, ctx, standin.StartOptions{Role: role, NetNSPath: ns, CgroupDir: cg})
	}
	// A process may hold 20000 descriptors here (and cannot raise that without
	// CAP_SYS_RESOURCE); the proxy holds two per connection, so several share
	// the work.
	for range loadProxies {
		px := start(standin.RoleProxy, p.NetNSPath(), p.ProxyCgrp)
		if err := px.StartProxy(ctx, standin.ProxySpec{Outbound: true, Inbound: true, HBONE: true, Quiet: true, DialTimeoutMS: 10000}); err != nil {
			t.Fatal(err)
		}
		rig.proxies = append(rig.proxies, px)
	}
	rig.app = start(standin.RoleApp, p.NetNSPath(), p.PodCgroup)
	rig.peer = start(standin.RolePeer, p.PeerNetNSPath(), p.PeerCgroup)
	for i := 0; i < loadPorts; i++ {
		for _, side := range []struct {
			a          *standin.Agent
			ip, ip6    string
			port       int
			dsts, dst6 *[]string
			names      *[]string
		}{{rig.peer, "10.77.0.1", "fd00:77::1", 20000 + i, &rig.outDsts, &rig.outDsts6, &rig.outNames},
			{rig.app, "10.77.0.2", "fd00:77::2", 8080 + i, &rig.inDsts, &rig.inDsts6, &rig.inNames}} {
			// Dual-stack: one server for both families.
			addr := fmt.Sprintf("[::]:%d", side.port)
			if _, err := side.a.Listen(ctx, standin.ListenSpec{Proto: "tcp", Addr: addr, Quiet: true, TimeoutMS: 120000}); err != nil {
				t.Fatal(err)
			}
			*side.dsts = append(*side.dsts, fmt.Sprintf("%s:%d", side.ip, side.port))
			*side.dst6 = append(*side.dst6, fmt.Sprintf("[%s]:%d", side.ip6, side.port))
			*side.names = append(*side.names, fmt.Sprintf("%s:%d", side.a.Role, side.port))
		}
	}
	recs, err := redirect.List(redirect.Options{Root: r.BPFFS})
	if err != nil {
		t.Fatal(err)
	}
	for _, rec := range recs {
		if rec.ID == p.ID {
			rig.cookie = rec.NetnsCookie
		}
	}
	if rig.cookie == 0 {
		t.Fatalf("pod %s not listed", p.ID)
	}
	return rig
}

// flowEntries counts the pod's entries in a per-connection map.
func (rig *loadRig) flowEntries(t *testing.T, name string) int {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(rig.run.BPFFS, "dp", "maps", name), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var k datapath.FlowKey
	var v []byte
	n := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		if k.Netns == rig.cookie {
			n++
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// waitFlowEntries waits (briefly: the last ACKs may still be in flight) until
// the pod has want entries in the map, and returns what it has.
func (rig *loadRig) waitFlowEntries(t *testing.T, name string, want int) int {
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := rig.flowEntries(t, name)
		if n == want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// direction is one way through the redirect.
type direction struct {
	name     string
	client   *standin.Agent
	dsts     []string
	expect   []string
	listener int // the proxy's listener the connections must cross
	server   *standin.Agent
}

// concurrent is a load of n connections open at once.
func (d direction) concurrent(n, timeoutMS int) standin.LoadSpec {
	spec := standin.LoadSpec{Count: n, Concurrent: true, Parallel: 512, TimeoutMS: timeoutMS}
	switch d.name {
	// One peer port towards two ports of the pod would clash after
	// REDIRECT (see in-same-source-port-two-ports) and wait for the first to
	// close, which here waits for all: one port each, and other ports for
	// the other family (whose earlier ones may be in TIME_WAIT).
	case "inbound":
		spec.SrcPortBase = 30000
	case "inbound6":
		spec.SrcPortBase = 50000
	}
	return spec
}

// directions are both ways through the redirect, in both families.
func (rig *loadRig) directions() []direction {
	return []direction{
		{"outbound", rig.app, rig.outDsts, rig.outNames, standin.PortOutbound, rig.peer},
		{"inbound", rig.peer, rig.inDsts, rig.inNames, standin.PortInbound, rig.app},
		{"outbound6", rig.app, rig.outDsts6, rig.outNames, standin.PortOutbound, rig.peer},
		{"inbound6", rig.peer, rig.inDsts6, rig.inNames, standin.PortInbound, rig.app},
	}
}

// events accumulates what agents report across polls (each poll clears them).
type events struct {
	counts   map[*standin.Agent]map[string]int
	maxIn    map[*standin.Agent]int
	inFlight map[*standin.Agent]int
}

func newEvents() *events {
	return &events{counts: map[*standin.Agent]map[string]int{}, maxIn: map[*standin.Agent]int{}, inFlight: map[*standin.Agent]int{}}
}

func (e *events) poll(ctx context.Context, agents ...*standin.Agent) error {
	for _, a := range agents {
		ev, err := a.Events(ctx)
		if err != nil {
			return err
		}
		if e.counts[a] == nil {
			e.counts[a] = map[string]int{}
		}
		for k, n := range ev.Counts {
			e.counts[a][k] += n
		}
		e.maxIn[a] = max(e.maxIn[a], ev.MaxInFlight)
		e.inFlight[a] = ev.InFlight
	}
	return nil
}

// proxies adds up the proxies' counts and their most in flight.
func (e *events) proxies(rig *loadRig) (map[string]int, int) {
	counts, maxIn := map[string]int{}, 0
	for _, a := range rig.proxies {
		for k, n := range e.counts[a] {
			counts[k] += n
		}
		maxIn += e.maxIn[a]
	}
	return counts, maxIn
}

func (rig *loadRig) agents() []*standin.Agent {
	return append([]*standin.Agent{rig.app, rig.peer}, rig.proxies...)
}

// settle polls until nothing is in flight, accumulating.
func (rig *loadRig) settle(ctx context.Context, e *events) error {
	for {
		if err := e.poll(ctx, rig.agents()...); err != nil {
			return err
		}
		busy := 0
		for _, a := range rig.agents() {
			busy += e.inFlight[a]
		}
		if busy == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("connections still in flight: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// runLoad runs a load in one direction. Concurrent, every connection is held
// once established until the servers have all of them open (the proxy dials
// its side after accepting): then all are open end to end at once.
func (rig *loadRig) runLoad(t *testing.T, d direction, spec standin.LoadSpec) (standin.LoadResult, *events) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := rig.settle(ctx, newEvents()); err != nil { // start from quiet counters
		t.Fatal(err)
	}
	spec.Dsts, spec.Expect, spec.TokenPrefix = d.dsts, d.expect, d.name
	e := newEvents()
	type result struct {
		res standin.LoadResult
		err error
	}
	done := make(chan result, 1)
	if spec.Concurrent {
		spec.Gate = fmt.Sprintf("load-%s-%d", d.name, time.Now().UnixNano())
	}
	go func() {
		res, err := d.client.Load(ctx, spec)
		done <- result{res, err}
	}()
	if spec.Gate != "" {
		if err := d.client.WaitGate(ctx, spec.Gate); err != nil {
			t.Error(err)
		}
		// Until every connection is open at its server or failed at the
		// proxy, within the time the gate and the proxy's relays allow.
		deadline := time.Now().Add(20 * time.Second)
		for e.poll(ctx, rig.agents()...) == nil && time.Now().Before(deadline) {
			px, _ := e.proxies(rig)
			if e.inFlight[d.server]+sum(px) >= spec.Count {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err := d.client.ReleaseGate(ctx, spec.Gate); err != nil {
			t.Error(err)
		}
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	res := r.res
	if err := rig.settle(ctx, e); err != nil {
		t.Fatal(err)
	}
	px, pxMax := e.proxies(rig)
	t.Logf("%s: %d connections (concurrent %v) in %v: ok %d, misrouted %d, failed %d %v; most open at once: client %d, proxies %d, servers %d; proxy %v; servers answered %d",
		d.name, spec.Count, spec.Concurrent, time.Duration(res.ElapsedMS)*time.Millisecond, res.OK, res.Misrouted, res.Failed, res.Outcomes,
		res.MaxOpen, pxMax, e.maxIn[d.server], px, sum(e.counts[d.server]))
	return res, e
}

// checkLoad requires every connection to have reached the right server
// through the proxy: none misrouted, none lost, none around the proxy.
func (rig *loadRig) checkLoad(t *testing.T, d direction, spec standin.LoadSpec, res standin.LoadResult, e *events) {
	t.Helper()
	count := spec.Count
	if res.Misrouted != 0 || res.Failed != 0 || res.OK != count {
		t.Errorf("%s: %d ok, %d misrouted, %d failed of %d: %v", d.name, res.OK, res.Misrouted, res.Failed, count, res.Examples)
	}
	px, _ := e.proxies(rig)
	relayed := px[fmt.Sprintf("proxy:%d:relayed", d.listener)]
	if relayed != count || sum(px) != count {
		t.Errorf("%s: the proxy relayed %d of %d connections on %d (all it saw: %v)", d.name, relayed, count, d.listener, px)
	}
	for i, name := range d.expect {
		want := count / len(d.expect)
		if i < count%len(d.expect) {
			want++
		}
		if got := e.counts[d.server][name]; got != want {
			t.Errorf("%s: server %s answered %d connections, want %d", d.name, name, got, want)
		}
	}
	if spec.Concurrent && (res.MaxOpen != count || e.maxIn[d.server] != count) {
		t.Errorf("%s: not all at once: the client had at most %d open, the servers %d, of %d", d.name, res.MaxOpen, e.maxIn[d.server], count)
	}
}

func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// loadSize is n, or n/10 with -short.
func loadSize(n int) int {
	if testing.Short() {
		return n / 10
	}
	return n
}

// 10,000 connections open at once through each redirect, each reaching the
// server it was meant for through the proxy with its own token; afterwards the
// per-connection map entries are back to none.
func TestLoadConcurrentConnections(t *testing.T) {
	rig := newLoadRig(t, nil)
	n := loadSize(10000)
	for _, d := range rig.directions() {
		t.Run(d.name, func(t *testing.T) {
			spec := d.concurrent(n, 20000)
			res, e := rig.runLoad(t, d, spec)
			rig.checkLoad(t, d, spec, res, e)
		})
	}
	for _, m := range []string{"out_flows", "in_flows"} {
		if left := rig.waitFlowEntries(t, m, 0); left != 0 {
			t.Errorf("%s: %d entries of the pod left after every connection closed", m, left)
		}
	}
}

// 100,000 short connections, one after the other (64 at a time), a quarter
// each way in each family: the per-connection entries return to their
// baseline (none).
func TestLoadChurnLeavesNoEntries(t *testing.T) {
	rig := newLoadRig(t, nil)
	n := loadSize(100000) / len(rig.directions())
	before := map[string]int{"out_flows": rig.flowEntries(t, "out_flows"), "in_flows": rig.flowEntries(t, "in_flows")}
	for _, d := range rig.directions() {
		t.Run(d.name, func(t *testing.T) {
			spec := standin.LoadSpec{Count: n, Parallel: 64, TimeoutMS: 20000}
			res, e := rig.runLoad(t, d, spec)
			rig.checkLoad(t, d, spec, res, e)
		})
	}
	for m, base := range before {
		if left := rig.waitFlowEntries(t, m, base); left != base {
			t.Errorf("%s: %d entries of the pod after %d connections, %d before", m, left, len(rig.directions())*n, base)
		}
	}
}

// With per-connection maps of a handful of entries, many connections at once
// evict each other's entries. A connection whose entry is gone must fail (the
// proxy sees no original destination and refuses the self call, or its
// packets are no longer rewritten and the pod resets them): it may never be
// handed another connection's destination, nor reach its own unproxied.
func TestTinyLRUMapsNeverMisroute(t *testing.T) {
	rig := newLoadRig(t, []string{"--max-flows", "8"})
	n := loadSize(2000)
	for _, d := range rig.directions() {
		t.Run(d.name, func(t *testing.T) {
			res, e := rig.runLoad(t, d, d.concurrent(n, 3000))
			if res.Misrouted != 0 {
				t.Errorf("%d connections got another's destination or reply: %v", res.Misrouted, res.Examples)
			}
			// Every connection a server answered went through the proxy.
			px, _ := e.proxies(rig)
			relayed := px[fmt.Sprintf("proxy:%d:relayed", d.listener)]
			if served := sum(e.counts[d.server]); served > relayed {
				t.Errorf("servers answered %d connections, the proxy relayed %d: some went around it", served, relayed)
			}
			if res.OK+res.Failed != n {
				t.Errorf("%d ok + %d failed of %d", res.OK, res.Failed, n)
			}
			if res.Failed == 0 {
				t.Logf("no connection lost its entry: the maps were not small enough to matter")
			}
		})
	}
}
