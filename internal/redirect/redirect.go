// Package redirect attaches and detaches the in-pod redirect for one pod: the
// shared programs are loaded once per node (pinned under the root), and each
// pod adds its links and its entries in the shared maps.
package redirect

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"

	"github.com/ebpf-redirect/ebpf-redirect/internal/cgroup"
	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// Options says where the pins live, what the rules are, and how to attach.
type Options struct {
	Root   string // a directory on bpffs; DefaultRoot if empty
	Config config.Config
	TCMode TCMode // "" means TCAuto
	Log    *slog.Logger
}

func (o Options) log() *slog.Logger {
	if o.Log != nil {
		return o.Log
	}
	return slog.New(slog.DiscardHandler)
}

// Pod names what to capture.
type Pod struct {
	ID          string
	Netns       string // a netns file: /run/netns/NAME or /proc/PID/ns/net
	Cgroup      string // the pod's cgroup v2 directory
	ProxyCgroup string // the proxy's cgroup v2 directory (for SO_ORIGINAL_DST); optional
}

// Result says what Attach did.
type Result struct {
	// AlreadyAttached: the pod was attached, with the same netns and cgroups,
	// and healthy; nothing was done.
	AlreadyAttached bool
	// Repaired: debris of an earlier, interrupted or broken attach of this pod
	// was removed first.
	Repaired bool
}

// ErrAlreadyAttached and ErrNotAttached let callers tell these apart.
var (
	ErrAlreadyAttached = errors.New("already attached")
	ErrNotAttached     = errors.New("not attached")
)

// FaultEnv names an environment variable for tests: set to a step name
// ("maps", "route", "tc", "cgroup", "proxy", "done") it makes Attach fail just
// before that step, to prove the unwinding leaves nothing behind. CrashEnv
// does the same with SIGKILL, to prove Reconcile cleans up after a crash.
const (
	FaultEnv = "EBPF_REDIRECT_FAULT_BEFORE"
	CrashEnv = "EBPF_REDIRECT_CRASH_BEFORE"
)

// sysctlAcceptLocal lets lo accept the replies the egress program sends back
// in with a local source address (the 0x111 return path).
const sysctlAcceptLocal = "net.ipv4.conf.lo.accept_local"

// cgroupHooks are the pod's cgroup programs, by pin name.
var cgroupHooks = []struct {
	pin    string
	attach ebpf.AttachType
	prog   func(*datapath.Datapath) *ebpf.Program
}{
	{"cgroup_connect4", ebpf.AttachCGroupInet4Connect, func(d *datapath.Datapath) *ebpf.Program { return d.PodConnect4 }},
	{"cgroup_getpeername4", ebpf.AttachCgroupInet4GetPeername, func(d *datapath.Datapath) *ebpf.Program { return d.PodGetpeername4 }},
	{"cgroup_connect6", ebpf.AttachCGroupInet6Connect, func(d *datapath.Datapath) *ebpf.Program { return d.PodConnect6 }},
	{"cgroup_getpeername6", ebpf.AttachCgroupInet6GetPeername, func(d *datapath.Datapath) *ebpf.Program { return d.PodGetpeername6 }},
	{"cgroup_sockops", ebpf.AttachCGroupSockOps, func(d *datapath.Datapath) *ebpf.Program { return d.PodSockops }},
	// Refuses new inbound connections that arrive on an interface without the
	// tc programs (added after attach, not yet refreshed): fail closed.
	{"cgroup_skb_ingress", ebpf.AttachCGroupInetIngress, func(d *datapath.Datapath) *ebpf.Program { return d.PodSockIngress }},
}

func tcProg(d *datapath.Datapath, ingress bool) *ebpf.Program {
	if ingress {
		return d.PodIngress
	}
	return d.PodEgress
}

func ip4(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:]) // network order in memory
}

func (o Options) route() podnet.PolicyRoute {
	return podnet.PolicyRoute{Mark: o.Config.ConnMark, Mask: o.Config.MarkMask, Table: o.Config.RouteTable, Priority: o.Config.RulePriority}
}

// resolved is a Pod whose paths were checked and named by their kernel ids.
type resolved struct {
	Pod
	ns     netns.NsHandle
	cookie uint64
	cg     cgroup.Cgroup
	pcg    cgroup.Cgroup
	info   podnet.Info
}

func resolve(p Pod) (*resolved, error) {
	if err := ValidatePodID(p.ID); err != nil {
		return nil, err
	}
	ns, err := podnet.Open(p.Netns)
	if err != nil {
		return nil, err
	}
	r := &resolved{Pod: p, ns: ns}
	fail := func(err error) (*resolved, error) { ns.Close(); return nil, err }
	if r.cg, err = cgroup.Open(p.Cgroup); err != nil {
		return fail(err)
	}
	if p.ProxyCgroup != "" {
		if r.pcg, err = cgroup.Open(p.ProxyCgroup); err != nil {
			return fail(fmt.Errorf("proxy %w", err))
		}
		if r.pcg.ID == r.cg.ID {
			return fail(fmt.Errorf("proxy cgroup %s is the pod's cgroup; the proxy must run outside the pod's cgroup", p.ProxyCgroup))
		}
	}
	if r.cookie, err = podnet.Cookie(ns); err != nil {
		return fail(err)
	}
	if r.info, err = podnet.Inspect(ns); err != nil {
		return fail(err)
	}
	if len(r.info.Ifaces) == 0 {
		return fail(fmt.Errorf("netns %s has no interface besides lo to attach to", p.Netns))
	}
	return r, nil
}

func (r *resolved) same(rec *Record) bool {
	return rec.NetnsCookie == r.cookie && rec.CgroupID == r.cg.ID && rec.ProxyCgroupID == r.pcg.ID
}

// Attach captures one pod. Either everything is attached and pinned, or
// nothing is (every step done is undone on failure), and no other pod is
// touched. Attaching an attached pod with the same netns and cgroups is a
// no-op (Result.AlreadyAttached); with different ones it is an error.
func Attach(ctx context.Context, o Options, p Pod) (Result, error) {
	if err := o.Config.Validate(); err != nil {
		return Result{}, fmt.Errorf("config: %w", err)
	}
	r, err := resolve(p)
	if err != nil {
		return Result{}, err
	}
	defer r.ns.Close()
	s, err := openStore(o.Root)
	if err != nil {
		return Result{}, err
	}
	defer s.Close()
	return attachLocked(ctx, o, s, r)
}

func attachLocked(ctx context.Context, o Options, s *store, r *resolved) (res Result, err error) {
	p := r.Pod
	if old, err := s.get(p.ID); err != nil {
		return res, err
	} else if old != nil {
		if !r.same(old) {
			return res, fmt.Errorf("pod %s: %w with netns %s and cgroup %s; detach it before attaching it elsewhere", p.ID, ErrAlreadyAttached, old.Netns, old.Cgroup)
		}
		var problem error = errors.New("attach never finished")
		if old.State == stateAttached {
			if problem = health(s, old); problem == nil {
				return Result{AlreadyAttached: true}, nil
			}
		}
		// Half attached (a crash) or broken: start again from nothing.
		o.log().Warn("repairing pod", "pod", p.ID, "state", old.State, "problem", problem)
		if err := detachLocked(o, s, old); err != nil {
			return res, fmt.Errorf("pod %s: removing a broken attach: %w", p.ID, err)
		}
		res.Repaired = true
	}
	for _, c := range []struct {
		kind uint64
		id   uint64
		what string
	}{{ownerNetns, r.cookie, "netns " + p.Netns}, {ownerCgroup, r.cg.ID, "cgroup " + p.Cgroup}} {
		if other, err := s.owner(c.kind, c.id); err != nil {
			return res, err
		} else if other != "" && other != p.ID {
			return res, fmt.Errorf("%s is already attached as pod %s", c.what, other)
		}
	}
	if _, err := os.Stat(s.podDir(p.ID)); err == nil {
		// Links pinned without a record cannot come from Attach (the record
		// goes first); clear them rather than fail forever.
		if err := removeLinks(s.podDir(p.ID)); err != nil {
			return res, err
		}
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	dp, err := s.datapath(&o.Config, o.log())
	if err != nil {
		return res, err
	}

	rec := &Record{
		ID: p.ID, State: stateAttaching, Netns: p.Netns, Cgroup: p.Cgroup, ProxyCgroup: p.ProxyCgroup,
		NetnsCookie: r.cookie, CgroupID: r.cg.ID, ProxyCgroupID: r.pcg.ID, AttachedAt: time.Now().UTC(),
		Route: o.route(),
	}
	if r.info.PodIP.IsValid() {
		rec.PodIP = r.info.PodIP.String()
	}
	for _, ifc := range r.info.Ifaces {
		x := Iface{Index: ifc.Index, Name: ifc.Name}
		if len(ifc.Addrs) > 0 {
			x.Primary = ifc.Addrs[0].String()
		}
		rec.Ifaces = append(rec.Ifaces, x)
	}
	for _, a := range r.info.Local {
		rec.Local = append(rec.Local, a.String())
	}

	// Every step pushes its undo; a failure anywhere unwinds them all.
	var undo []func() error
	defer func() {
		if err == nil {
			return
		}
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil {
				err = errors.Join(err, fmt.Errorf("undoing a step: %w", uerr))
			}
		}
		// If this was the node's first pod, unload the datapath again.
		if perr := s.pruneIfEmpty(o.log()); perr != nil {
			err = errors.Join(err, perr)
		}
	}()
	step := func(name string) error {
		if cerr := ctx.Err(); cerr != nil {
			return fmt.Errorf("interrupted before %s: %w", name, cerr)
		}
		o.log().Debug("attach step", "pod", p.ID, "step", name)
		injectCrash(name)
		if os.Getenv(FaultEnv) == name {
			return fmt.Errorf("injected fault before %s (%s)", name, FaultEnv)
		}
		return nil
	}

	// The record goes first so that a process killed half way leaves a trace
	// that detach and reconcile can follow; then it is rewritten after each
	// step that creates something it must know about.
	if err = s.put(rec); err != nil {
		return res, fmt.Errorf("recording pod %s: %w", p.ID, err)
	}
	undo = append(undo, func() error { return s.del(p.ID) })
	for _, c := range []struct{ kind, id uint64 }{{ownerNetns, r.cookie}, {ownerCgroup, r.cg.ID}} {
		if err = s.setOwner(c.kind, c.id, p.ID); err != nil {
			return res, err
		}
		c := c
		undo = append(undo, func() error { return s.dropOwner(c.kind, c.id, p.ID) })
	}

	if err = step("maps"); err != nil {
		return res, err
	}
	undo = append(undo, func() error { return deleteEntries(dp, rec) })
	if err = putEntries(dp, rec, r.info); err != nil {
		return res, err
	}

	if err = step("route"); err != nil {
		return res, err
	}
	if rec.RuleCreated, rec.RouteCreated, err = rec.Route.Install(r.ns); err != nil {
		return res, err
	}
	undo = append(undo, func() error { return rec.Route.Remove(r.ns, rec.RuleCreated, rec.RouteCreated) })
	if rec.AcceptLocal, err = podnet.SetSysctl(r.ns, sysctlAcceptLocal, "1"); err != nil {
		return res, err
	}
	undo = append(undo, func() error { _, err := podnet.SetSysctl(r.ns, sysctlAcceptLocal, rec.AcceptLocal); return err })
	if err = s.put(rec); err != nil {
		return res, err
	}

	dir := s.podDir(p.ID)
	if err = os.MkdirAll(dir, 0o700); err != nil {
		return res, err
	}
	undo = append(undo, func() error { return removeLinks(dir) })

	if err = step("tc"); err != nil {
		return res, err
	}
	for _, ifc := range rec.Ifaces {
		for _, ingress := range []bool{true, false} {
			var a TCAttachment
			a, err = attachTC(r.ns, o.TCMode, TCAttachment{Ifindex: ifc.Index, Iface: ifc.Name, Ingress: ingress}, tcProg(dp, ingress), dir)
			if err != nil {
				return res, err
			}
			rec.TC = append(rec.TC, a)
			undo = append(undo, func() error { return detachTC(r.ns, a, dir) })
			if err = s.put(rec); err != nil {
				return res, err
			}
		}
	}

	if err = step("cgroup"); err != nil {
		return res, err
	}
	for _, h := range cgroupHooks {
		var l link.Link
		l, err = link.AttachCgroup(link.CgroupOptions{Path: r.cg.Path, Attach: h.attach, Program: h.prog(dp)})
		if err != nil {
			return res, fmt.Errorf("attaching %s to %s: %w", h.pin, r.cg.Path, err)
		}
		if err = pinLink(l, filepath.Join(dir, h.pin)); err != nil {
			return res, err
		}
	}

	if r.pcg.ID != 0 {
		if err = step("proxy"); err != nil {
			return res, err
		}
		if err = attachProxy(s, dp, r.pcg); err != nil {
			return res, err
		}
		undo = append(undo, func() error { return releaseProxy(s, r.pcg.ID) })
		rec.ProxyCounted = true
		if err = s.put(rec); err != nil {
			return res, err
		}
	}

	if err = step("done"); err != nil {
		return res, err
	}
	rec.State = stateAttached
	if err = s.put(rec); err != nil {
		return res, err
	}
	o.log().Info("attached", "pod", p.ID, "netns", p.Netns, "cgroup", p.Cgroup, "ifaces", len(rec.Ifaces), "pod_ip", rec.PodIP, "tc", rec.TC[0].Mode)
	return res, nil
}

func injectCrash(step string) {
	if os.Getenv(CrashEnv) == step {
		p, _ := os.FindProcess(os.Getpid())
		_ = p.Kill() // SIGKILL: no deferred cleanup runs, as in a real crash
		select {}
	}
}

// attachProxy attaches the SO_ORIGINAL_DST program at the proxy's cgroup once,
// and counts the pods that use it.
func attachProxy(s *store, dp *datapath.Datapath, pcg cgroup.Cgroup) error {
	pin := s.proxyPin(pcg.ID)
	if _, err := os.Stat(pin); err != nil {
		if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
			return err
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: pcg.Path, Attach: ebpf.AttachCGroupGetsockopt, Program: dp.ProxyGetsockopt})
		if err != nil {
			return fmt.Errorf("attaching getsockopt to the proxy cgroup %s: %w", pcg.Path, err)
		}
		if err := pinLink(l, pin); err != nil {
			return err
		}
	}
	_, err := s.proxyRefs(pcg.ID, 1)
	return err
}

// releaseProxy drops one pod's use of the proxy link, removing it with the last.
func releaseProxy(s *store, cgroupID uint64) error {
	n, err := s.proxyRefs(cgroupID, -1)
	if err != nil || n > 0 {
		return err
	}
	return removeLinks(filepath.Dir(s.proxyPin(cgroupID)))
}

func pinLink(l link.Link, path string) error {
	if err := l.Pin(path); err != nil {
		l.Close()
		return fmt.Errorf("pinning link %s: %w", path, err)
	}
	// The pin keeps the link; this process's handle is not needed.
	return l.Close()
}

// removeLinks unpins every link in dir (which detaches it) and removes dir.
func removeLinks(dir string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		errs = append(errs, unpinLink(filepath.Join(dir, e.Name())))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func putEntries(dp *datapath.Datapath, r *Record, info podnet.Info) error {
	for _, a := range info.Local {
		if err := dp.LocalAddrs.Put(datapath.LocalKey{Netns: r.NetnsCookie, Addr: ip4(a)}, uint8(1)); err != nil {
			return fmt.Errorf("local address map: %w", err)
		}
	}
	for _, ifc := range info.Ifaces {
		var v datapath.IfaceInfo
		if len(ifc.Addrs) > 0 {
			v.PrimaryIp = ip4(ifc.Addrs[0])
		}
		if err := dp.Ifaces.Put(datapath.IfaceKey{Netns: r.NetnsCookie, Ifindex: uint32(ifc.Index)}, v); err != nil {
			return fmt.Errorf("interface map: %w", err)
		}
	}
	var pi datapath.PodInfo
	if info.PodIP.IsValid() {
		pi.PodIp = ip4(info.PodIP)
	}
	// The pod entry last: it is what turns the cgroup programs on.
	if err := dp.Pods.Put(r.NetnsCookie, pi); err != nil {
		return fmt.Errorf("pod map: %w", err)
	}
	return nil
}

// deleteEntries removes every map entry of the pod: its config, and its flows
// and counters (keyed by its netns cookie, which the kernel never reuses).
func deleteEntries(dp *datapath.Datapath, r *Record) error {
	var errs []error
	del := func(m *ebpf.Map, k any) {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	del(dp.Pods, r.NetnsCookie)
	for _, ifc := range r.Ifaces {
		del(dp.Ifaces, datapath.IfaceKey{Netns: r.NetnsCookie, Ifindex: uint32(ifc.Index)})
	}
	for _, s := range r.Local {
		if a, err := netip.ParseAddr(s); err == nil {
			del(dp.LocalAddrs, datapath.LocalKey{Netns: r.NetnsCookie, Addr: ip4(a)})
		}
	}
	for rule := datapath.Rule(0); rule < datapath.RuleMax; rule++ {
		del(dp.Counters, datapath.CounterKey{Netns: r.NetnsCookie, Rule: rule})
	}
	for _, m := range []*ebpf.Map{dp.InFlows, dp.OutFlows} {
		var k datapath.FlowKey
		var v []byte
		var keys []datapath.FlowKey
		it := m.Iterate()
		for it.Next(&k, &v) {
			if k.Netns == r.NetnsCookie {
				keys = append(keys, k)
			}
		}
		for _, k := range keys {
			del(m, k)
		}
	}
	return errors.Join(errs...)
}

// Detach removes everything Attach made for the pod, also after an attach
// that was killed half way.
func Detach(ctx context.Context, o Options, id string) error {
	if err := ValidatePodID(id); err != nil {
		return err
	}
	s, err := openStore(o.Root)
	if err != nil {
		return err
	}
	defer s.Close()
	r, err := s.get(id)
	if err != nil {
		return err
	}
	if r == nil {
		if _, serr := os.Stat(s.podDir(id)); serr == nil {
			return removeLinks(s.podDir(id))
		}
		return fmt.Errorf("pod %s: %w", id, ErrNotAttached)
	}
	if err := detachLocked(o, s, r); err != nil {
		return err
	}
	return s.pruneIfEmpty(o.log())
}

// detachLocked undoes what the record says was done; parts already gone (the
// netns deleted, the cgroup removed) are skipped. The record goes last, so a
// detach that fails can be retried.
func detachLocked(o Options, s *store, r *Record) error {
	var errs []error
	dir := s.podDir(r.ID)
	// The netns, if the path still names the same one.
	ns := netns.NsHandle(-1)
	if h, err := podnet.Open(r.Netns); err == nil {
		if c, cerr := podnet.Cookie(h); cerr == nil && c == r.NetnsCookie {
			ns = h
		} else {
			h.Close()
		}
	}
	defer func() {
		if ns >= 0 {
			ns.Close()
		}
	}()
	// Links first: from here on nothing new is captured.
	for _, a := range r.TC {
		errs = append(errs, detachTC(ns, a, dir))
	}
	errs = append(errs, removeLinks(dir))
	if ns >= 0 {
		errs = append(errs, undoNetns(ns, r))
	}
	if d, derr := s.datapath(nil, o.log()); derr == nil {
		errs = append(errs, deleteEntries(d, r))
	} else if !errors.Is(derr, os.ErrNotExist) {
		errs = append(errs, derr)
	}
	if r.ProxyCounted {
		errs = append(errs, releaseProxy(s, r.ProxyCgroupID))
	} else if r.ProxyCgroupID != 0 {
		// An attach killed between attaching the proxy link and counting
		// itself: the link goes if no pod counts on it.
		if n, err := s.proxyRefs(r.ProxyCgroupID, 0); err == nil && n == 0 {
			errs = append(errs, removeLinks(filepath.Dir(s.proxyPin(r.ProxyCgroupID))))
		}
	}
	errs = append(errs, s.dropOwner(ownerNetns, r.NetnsCookie, r.ID), s.dropOwner(ownerCgroup, r.CgroupID, r.ID))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("detaching pod %s: %w", r.ID, err)
	}
	if err := s.del(r.ID); err != nil {
		return err
	}
	o.log().Info("detached", "pod", r.ID)
	return nil
}

func undoNetns(ns netns.NsHandle, r *Record) error {
	err := r.Route.Remove(ns, r.RuleCreated, r.RouteCreated)
	if r.AcceptLocal != "" {
		if _, serr := podnet.SetSysctl(ns, sysctlAcceptLocal, r.AcceptLocal); serr != nil {
			err = errors.Join(err, serr)
		}
	}
	return err
}
