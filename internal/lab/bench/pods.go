package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/equiv"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// The backends, in the order every round runs them.
const (
	None     = "none"
	Iptables = "iptables"
	Ebpf     = "ebpf"
)

// Backends lists the backends in order.
var Backends = []string{None, Iptables, Ebpf}

// serverPort is where the servers listen: R's server (outbound) and the pod's
// application (inbound).
const serverPort = 8080

// benchPod is one backend's pod: its capture, and the three agents (the proxy in the
// proxy cgroup; the pod's application in the pod cgroup, which is the outbound
// generator and the inbound server; R, the outbound server and the inbound generator).
type benchPod struct {
	backend string
	run     *topology.Run
	pod     *topology.Pod
	capture equiv.Backend // nil for none
	applied bool

	proxy, app, peer *standin.Agent
	progs            map[string]*ebpf.Program // ebpf: the pinned programs, for their stats
}

// Both namespaces must sustain tens of thousands of short connections a second:
// wide port ranges, and TIME_WAIT reuse on outgoing connections (the proxy's upstream
// legs, R's inbound generator). The ranges do not overlap: R's generator is a single
// client address, and the proxy connects to the application from that address
// (transparently, from a port picked in the pod); with overlapping ranges the two
// tuples collide in conntrack far more often than with a real node's many clients.
// Same for every backend.
var (
	podSysctls = [][2]string{
		{"net.ipv4.ip_local_port_range", "32768 65535"},
		{"net.ipv4.tcp_tw_reuse", "1"},
	}
	peerSysctls = [][2]string{
		{"net.ipv4.ip_local_port_range", "1024 32767"},
		{"net.ipv4.tcp_tw_reuse", "1"},
	}
)

func newBenchPod(ctx context.Context, run *topology.Run, backend string, capture equiv.Backend, agentExe string) (bp *benchPod, err error) {
	pod, err := run.NewPod()
	if err != nil {
		return nil, err
	}
	bp = &benchPod{backend: backend, run: run, pod: pod, capture: capture}
	defer func() {
		if err != nil {
			err = errors.Join(err, bp.close())
			bp = nil
		}
	}()
	for path, sysctls := range map[string][][2]string{pod.NetNSPath(): podSysctls, pod.PeerNetNSPath(): peerSysctls} {
		ns, err := podnet.Open(path)
		if err != nil {
			return bp, err
		}
		for _, kv := range sysctls {
			if _, err := podnet.SetSysctl(ns, kv[0], kv[1]); err != nil {
				ns.Close()
				return bp, err
			}
		}
		ns.Close()
	}
	if capture != nil {
		if err := capture.Apply(ctx, run, pod); err != nil {
			return bp, fmt.Errorf("%s: %w", backend, err)
		}
		bp.applied = true
	}
	start := func(ns, cg string) (*standin.Agent, error) {
		return standin.Start(ctx, standin.StartOptions{Role: Role, NetNSPath: ns, CgroupDir: cg, Exe: agentExe})
	}
	if bp.proxy, err = start(pod.NetNSPath(), pod.ProxyCgrp); err != nil {
		return bp, err
	}
	if bp.app, err = start(pod.NetNSPath(), pod.PodCgroup); err != nil {
		return bp, err
	}
	if bp.peer, err = start(pod.PeerNetNSPath(), pod.PeerCgroup); err != nil {
		return bp, err
	}
	srv := serveSpec{Addr: fmt.Sprintf("[::]:%d", serverPort)} // dual-stack
	if err := call(ctx, bp.peer, opServe, srv, nil); err != nil {
		return bp, err
	}
	if err := call(ctx, bp.app, opServe, srv, nil); err != nil {
		return bp, err
	}
	ps := proxySpec{
		OutboundFallback:  hostPort(topology.PeerIP, serverPort),
		InboundFallback:   hostPort(topology.PodIP, serverPort),
		OutboundFallback6: hostPort(topology.PeerIP6, serverPort),
		InboundFallback6:  hostPort(topology.PodIP6, serverPort),
		Transparent:       backend != None,
	}
	if err := call(ctx, bp.proxy, opProxy, ps, nil); err != nil {
		return bp, err
	}
	if backend == Ebpf {
		if bp.progs, err = pinnedPrograms(run.BPFFS); err != nil {
			return bp, err
		}
	}
	return bp, nil
}

func hostPort(ip net.IP, port int) string { return net.JoinHostPort(ip.String(), fmt.Sprint(port)) }

// pinnedPrograms opens the programs ebpf-redirect pinned under <bpffs>/dp,
// by name (the caller closes them).
func pinnedPrograms(bpffs string) (map[string]*ebpf.Program, error) {
	dp, err := datapath.Open(filepath.Join(bpffs, "dp"), nil, datapath.Options{})
	if err != nil {
		return nil, err
	}
	progs := map[string]*ebpf.Program{}
	for name, p := range dp.ProgramsByName() {
		c, err := p.Clone()
		if err != nil {
			dp.Close()
			return nil, err
		}
		progs[name] = c
	}
	dp.Close()
	return progs, nil
}

// close stops the agents, removes the capture and tears the pod down.
func (bp *benchPod) close() error {
	var errs []error
	for _, p := range bp.progs {
		p.Close()
	}
	bp.progs = nil
	for _, a := range []*standin.Agent{bp.proxy, bp.app, bp.peer} {
		if a != nil {
			_ = a.Close()
		}
	}
	bp.proxy, bp.app, bp.peer = nil, nil, nil
	if bp.applied {
		// A fresh context: teardown must happen after a cancelled run too.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := bp.capture.Remove(ctx, bp.run, bp.pod); err != nil {
			errs = append(errs, err)
		}
		cancel()
		bp.applied = false
	}
	if err := bp.pod.Close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// call sends one command to a bench agent and decodes its result into out.
func call(ctx context.Context, a *standin.Agent, op string, args, out any) error {
	raw, err := json.Marshal(args)
	if err != nil {
		return err
	}
	r, err := a.Call(ctx, standin.Command{Op: op, Args: raw})
	if err != nil {
		return err
	}
	if out != nil {
		return json.Unmarshal(r.Result, out)
	}
	return nil
}

// target is where a generator connects for a direction under this backend: the
// original destination (captured), or the proxy's listener itself (none).
func (bp *benchPod) target(dir string, v6 bool) string {
	lo, peer, pod := net.IPv4(127, 0, 0, 1), topology.PeerIP, topology.PodIP
	if v6 {
		lo, peer, pod = net.IPv6loopback, topology.PeerIP6, topology.PodIP6
	}
	switch {
	case dir == dirOut && bp.backend == None:
		return hostPort(lo, standin.PortOutbound)
	case dir == dirOut, dir == dirDirect:
		return hostPort(peer, serverPort)
	case bp.backend == None:
		return hostPort(pod, standin.PortInbound)
	default:
		return hostPort(pod, serverPort)
	}
}

// generator is the agent that runs the load for a direction.
func (bp *benchPod) generator(dir string) *standin.Agent {
	if dir == dirIn {
		return bp.peer
	}
	return bp.app
}

// cgroups whose CPU counts for this pod: everything the bench runs for it.
func (bp *benchPod) cgroups() map[string]string {
	return map[string]string{"pod": bp.pod.PodCgroup, "proxy": bp.pod.ProxyCgrp, "peer": bp.pod.PeerCgroup}
}
