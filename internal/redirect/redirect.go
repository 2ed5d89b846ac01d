// Package redirect attaches and detaches the in-pod redirect for one pod: the
// shared programs are loaded once per node (pinned under the root), and each
// pod adds its links and its entries in the shared maps.
package redirect

import (
	"context"
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
	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/cgroup"
	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// Options says where the pins live, what the rules are, and how to attach.
type Options struct {
	Root string // a directory on bpffs; DefaultRoot if empty
	// Config is the node's config, already validated (manager.New does it).
	Config config.Config
	TCMode TCMode // "" means TCAuto
	Log    *slog.Logger
	// MountBPFFS mounts a bpffs at /sys/fs/bpf when Root is DefaultRoot and
	// none is mounted there, as node agents do on a fresh machine.
	MountBPFFS bool

	// Test seams; the product never sets them.
	// BeforeStep runs before each step of an attach (see attachSteps); an
	// error fails the attach at that step.
	BeforeStep func(step string) error
	// Datapath loads another build than the embedded one (upgrade tests).
	Datapath datapath.Options
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

// The pod's sysctls the return path needs (bpf/returnpath.c): a request
// socket, and the socket accepted from it, take the SYN's mark (IPv4 and
// IPv6), and a reply the kernel makes without a socket (a reset) the mark of
// what it answers.
const (
	sysctlFwmarkAccept   = "net.ipv4.tcp_fwmark_accept"
	sysctlFwmarkReflect  = "net.ipv4.fwmark_reflect"
	sysctlFwmarkReflect6 = "net.ipv6.fwmark_reflect"
)

// sysctls are the ones attach sets, for the node's config.
func sysctls(c config.Config) []string {
	out := []string{sysctlFwmarkAccept, sysctlFwmarkReflect}
	if c.IPv6 {
		out = append(out, sysctlFwmarkReflect6)
	}
	return out
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
// nothing is (a failed attach is undone by the code detach uses), and no
// other pod is touched. Attaching an attached pod with the same netns and
// cgroups is a no-op (Result.AlreadyAttached); with different ones it is an
// error.
func Attach(ctx context.Context, o Options, p Pod) (Result, error) {
	r, err := resolve(p)
	if err != nil {
		return Result{}, err
	}
	defer r.ns.Close()
	s, err := openStore(o, false)
	if err != nil {
		return Result{}, err
	}
	defer s.Close()
	return attachLocked(ctx, o, s, r)
}

func attachLocked(ctx context.Context, o Options, s *store, r *resolved) (Result, error) {
	res, done, err := s.adopt(o, r)
	if done || err != nil {
		return res, err
	}
	dp, err := s.datapath(&o.Config, o)
	if err != nil {
		return res, err
	}
	a := &attachment{o: o, s: s, r: r, dp: dp, rec: newRecord(o, r)}
	for _, st := range a.steps() {
		err := ctx.Err()
		if err == nil && o.BeforeStep != nil {
			err = o.BeforeStep(st.name)
		}
		if err == nil {
			o.log().Debug("attach step", "pod", r.ID, "step", st.name)
			err = st.run()
		}
		if err != nil {
			// The record says what was done so far; detach undoes exactly that.
			err = fmt.Errorf("attaching pod %s: step %s: %w", r.ID, st.name, err)
			return res, errors.Join(err, detachLocked(o, s, a.rec), s.pruneIfEmpty(o.log()))
		}
	}
	o.log().Info("attached", "pod", r.ID, "netns", r.Netns, "cgroup", r.Cgroup, "ifaces", len(a.rec.Ifaces), "pod_ip", a.rec.PodIP, "tc", a.rec.TC[0].Mode)
	return res, nil
}

// adopt decides what to do with a pod already recorded: nothing (healthy and
// the same: done), or remove what is left of it first (half attached, or
// broken). It also refuses a netns or cgroup that another pod holds.
func (s *store) adopt(o Options, r *resolved) (res Result, done bool, err error) {
	old, err := s.get(r.ID)
	if err != nil {
		return res, false, err
	}
	if old != nil {
		if !r.same(old) {
			return res, false, fmt.Errorf("pod %s: %w with netns %s and cgroup %s; detach it before attaching it elsewhere", r.ID, ErrAlreadyAttached, old.Netns, old.Cgroup)
		}
		var problem error = errors.New("attach never finished")
		if old.State == stateAttached {
			if problem = health(s, old); problem == nil {
				return Result{AlreadyAttached: true}, true, nil
			}
		}
		o.log().Warn("repairing pod", "pod", r.ID, "state", old.State, "problem", problem)
		if err := detachLocked(o, s, old); err != nil {
			return res, false, fmt.Errorf("pod %s: removing a broken attach: %w", r.ID, err)
		}
		res.Repaired = true
	}
	for _, c := range []struct {
		kind uint64
		id   uint64
		what string
	}{{ownerNetns, r.cookie, "netns " + r.Netns}, {ownerCgroup, r.cg.ID, "cgroup " + r.Cgroup}} {
		if other, err := s.owner(c.kind, c.id); err != nil {
			return res, false, err
		} else if other != "" && other != r.ID {
			return res, false, fmt.Errorf("%s is already attached as pod %s", c.what, other)
		}
	}
	// Links pinned without a record cannot come from Attach (the record goes
	// first); clear them rather than fail forever.
	return res, false, removeLinks(s.podDir(r.ID))
}

func newRecord(o Options, r *resolved) *Record {
	rec := &Record{
		ID: r.ID, State: stateAttaching, Netns: r.Netns, Cgroup: r.Cgroup, ProxyCgroup: r.ProxyCgroup,
		NetnsCookie: r.cookie, CgroupID: r.cg.ID, ProxyCgroupID: r.pcg.ID, AttachedAt: time.Now().UTC(),
		Route: o.route(),
	}
	rec.setPod(r.info)
	for _, ifc := range r.info.Ifaces {
		rec.Ifaces = append(rec.Ifaces, recordIface(ifc))
	}
	for _, a := range r.info.Local {
		rec.Local = append(rec.Local, a.String())
	}
	return rec
}

// setPod records the pod's source addresses, as pods holds them.
func (r *Record) setPod(info podnet.Info) {
	r.PodIP, r.PodIP6, r.PodLL6, r.PodLLIndex = addrString(info.PodIP), addrString(info.PodIP6), addrString(info.PodLL6), info.PodLLIndex
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func firstString(as []netip.Addr) string {
	if len(as) == 0 {
		return ""
	}
	return as[0].String()
}

// recordIface is an interface as the record keeps it: where REDIRECT sends
// what arrives on it.
func recordIface(ifc podnet.Iface) Iface {
	return Iface{Index: ifc.Index, Name: ifc.Name, Primary: firstString(ifc.Addrs),
		Primary6: firstString(ifc.Global6), LL6: firstString(ifc.LinkLocal6)}
}

// attachment is one attach in progress. Each step records what it made
// before it goes on, so that a process killed at any point leaves a record
// that detach (and reconcile) can follow.
type attachment struct {
	o   Options
	s   *store
	r   *resolved
	dp  *datapath.Datapath
	rec *Record
}

// Attach steps, in order; BeforeStep sees these names.
const (
	StepRecord = "record"
	StepMaps   = "maps"
	StepRoute  = "route"
	StepSysctl = "sysctl"
	StepTC     = "tc"
	StepCgroup = "cgroup"
	StepProxy  = "proxy"
	StepDone   = "done"
)

type step struct {
	name string
	run  func() error
}

func (a *attachment) steps() []step {
	return []step{
		{StepRecord, a.record},
		{StepMaps, a.maps},
		{StepRoute, a.route},
		{StepSysctl, a.sysctl},
		{StepTC, a.tc},
		{StepCgroup, a.cgroup},
		{StepProxy, a.proxy},
		{StepDone, a.done},
	}
}

// AttachSteps are the names of the steps of an attach, in order.
func AttachSteps() []string {
	var out []string
	for _, st := range (&attachment{}).steps() {
		out = append(out, st.name)
	}
	return out
}

// record writes the pod's record (state attaching) and claims its netns and
// cgroup.
func (a *attachment) record() error {
	if err := a.s.put(a.rec); err != nil {
		return err
	}
	for _, c := range []struct{ kind, id uint64 }{{ownerNetns, a.rec.NetnsCookie}, {ownerCgroup, a.rec.CgroupID}} {
		if err := a.s.setOwner(c.kind, c.id, a.rec.ID); err != nil {
			return err
		}
	}
	return nil
}

// maps writes the pod's entries in the shared maps; the pod entry goes last,
// since it is what turns the pod's cgroup programs on.
func (a *attachment) maps() error {
	dp, rec, info := a.dp, a.rec, a.r.info
	for _, ad := range info.Local {
		if err := dp.LocalAddrs.Put(localKey(rec, ad), uint8(1)); err != nil {
			return mapErr("local address", err, a.o.Config)
		}
	}
	for _, ifc := range info.Ifaces {
		if err := dp.Ifaces.Put(ifaceKey(rec, ifc.Index), ifaceInfo(ifc)); err != nil {
			return mapErr("interface", err, a.o.Config)
		}
	}
	if err := dp.Pods.Put(rec.NetnsCookie, podInfo(info)); err != nil {
		return mapErr("pod", err, a.o.Config)
	}
	return nil
}

// mapErr names the map an entry did not fit in, and the flag that sizes it.
func mapErr(what string, err error, c config.Config) error {
	if errors.Is(err, unix.E2BIG) {
		return fmt.Errorf("%s map is full (the node's maps hold %d pods: --max-pods): %w", what, c.MaxPods, err)
	}
	return fmt.Errorf("%s map: %w", what, err)
}

func localKey(r *Record, a netip.Addr) datapath.LocalKey {
	return datapath.LocalKey{Netns: r.NetnsCookie, Addr: datapath.Addr(a)}
}

func ifaceKey(r *Record, index int) datapath.IfaceKey {
	return datapath.IfaceKey{Netns: r.NetnsCookie, Ifindex: uint32(index)}
}

func ifaceInfo(ifc podnet.Iface) datapath.IfaceInfo {
	var v datapath.IfaceInfo
	if len(ifc.Addrs) > 0 {
		v.Primary4 = datapath.IP4(ifc.Addrs[0])
	}
	if len(ifc.Global6) > 0 {
		v.Primary6 = datapath.Addr(ifc.Global6[0])
	}
	if len(ifc.LinkLocal6) > 0 {
		v.Ll6 = datapath.Addr(ifc.LinkLocal6[0])
	}
	return v
}

func podInfo(info podnet.Info) datapath.PodInfo {
	pi := datapath.PodInfo{Ip4: datapath.IP4(info.PodIP), LlIfindex: uint32(info.PodLLIndex)}
	if info.PodIP6.IsValid() {
		pi.Ip6 = datapath.Addr(info.PodIP6)
	}
	if info.PodLL6.IsValid() {
		pi.Ll6 = datapath.Addr(info.PodLL6)
	}
	return pi
}

// route installs the policy route of the connection mark, for IPv6 too when
// IPv6 is captured.
func (a *attachment) route() (err error) {
	a.rec.RuleCreated, a.rec.RouteCreated, err = a.rec.Route.Install(a.r.ns, unix.AF_INET)
	if err == nil {
		err = a.s.put(a.rec)
	}
	if err != nil || !a.o.Config.IPv6 {
		return err
	}
	a.rec.Rule6Created, a.rec.Route6Created, err = a.rec.Route.Install(a.r.ns, unix.AF_INET6)
	if err != nil {
		return err
	}
	return a.s.put(a.rec)
}

// sysctl sets the return path's sysctls, recording each one's old value.
func (a *attachment) sysctl() error {
	if a.rec.Sysctls == nil {
		a.rec.Sysctls = map[string]string{}
	}
	for _, name := range sysctls(a.o.Config) {
		old, err := podnet.SetSysctl(a.r.ns, name, "1")
		if err != nil {
			return err
		}
		a.rec.Sysctls[name] = old
		if err := a.s.put(a.rec); err != nil {
			return err
		}
	}
	return nil
}

// tc attaches the tc programs on every interface, and on lo, recording each.
func (a *attachment) tc() error {
	dir := a.s.podDir(a.rec.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	hooks, err := a.dp.Hooks(datapath.ScopeTC)
	if err != nil {
		return err
	}
	for _, ifc := range a.rec.Ifaces {
		if err := attachIface(a.r.ns, a.o.TCMode, hooks, ifc, dir, a.s, a.rec); err != nil {
			return err
		}
	}
	lo, err := a.dp.Hooks(datapath.ScopeLo)
	if err != nil {
		return err
	}
	return attachIface(a.r.ns, a.o.TCMode, lo, Iface{Index: loIfindex, Name: "lo"}, dir, a.s, a.rec)
}

// loIfindex is lo's, in every network namespace.
const loIfindex = 1

// attachIface attaches every tc hook on one interface, recording each
// attachment as soon as it exists.
func attachIface(ns netns.NsHandle, mode TCMode, hooks []datapath.Hook, ifc Iface, dir string, s *store, rec *Record) error {
	if len(rec.TC) > 0 {
		mode = rec.TC[0].Mode // one pod, one kind of attachment
	}
	for _, h := range hooks {
		at, err := attachTC(ns, mode, TCAttachment{Prog: h.Name, Ifindex: ifc.Index, Iface: ifc.Name, Ingress: h.Attach == ebpf.AttachTCXIngress}, h.Program, dir)
		if err != nil {
			return err
		}
		rec.TC = append(rec.TC, at)
		if err := s.put(rec); err != nil {
			return err
		}
	}
	return nil
}

// cgroup attaches the pod's cgroup programs (multi-attach links, pinned in
// the pod's directory, which detach empties).
func (a *attachment) cgroup() error {
	hooks, err := a.dp.Hooks(datapath.ScopePod)
	if err != nil {
		return err
	}
	for _, h := range hooks {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: a.r.cg.Path, Attach: h.Attach, Program: h.Program})
		if err != nil {
			return fmt.Errorf("attaching %s to %s: %w", h.Name, a.r.cg.Path, err)
		}
		if err := pinLink(l, filepath.Join(a.s.podDir(a.rec.ID), h.Name)); err != nil {
			return err
		}
	}
	return nil
}

// proxy attaches the SO_ORIGINAL_DST program at the proxy's cgroup (once per
// proxy) and counts the pod as one of its users.
func (a *attachment) proxy() error {
	if a.r.pcg.ID == 0 {
		return nil
	}
	if err := attachProxy(a.s, a.dp, a.r.pcg); err != nil {
		return err
	}
	a.rec.ProxyCounted = true
	return a.s.put(a.rec)
}

func (a *attachment) done() error {
	a.rec.State = stateAttached
	return a.s.put(a.rec)
}

// attachProxy attaches the proxy's programs at its cgroup once, and counts
// the pods that use them.
func attachProxy(s *store, dp *datapath.Datapath, pcg cgroup.Cgroup) error {
	dir := s.proxyDir(pcg.ID)
	hooks, err := dp.Hooks(datapath.ScopeProxy)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for _, h := range hooks {
		pin := filepath.Join(dir, h.Name)
		if _, err := os.Stat(pin); err == nil {
			continue
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: pcg.Path, Attach: h.Attach, Program: h.Program})
		if err != nil {
			return fmt.Errorf("attaching %s to the proxy cgroup %s: %w", h.Name, pcg.Path, err)
		}
		if err := pinLink(l, pin); err != nil {
			return err
		}
	}
	_, err = s.proxyRefs(pcg.ID, 1)
	return err
}

// releaseProxy drops one pod's use of the proxy's links, removing them with
// the last.
func releaseProxy(s *store, cgroupID uint64) error {
	n, err := s.proxyRefs(cgroupID, -1)
	if err != nil || n > 0 {
		return err
	}
	return removeLinks(s.proxyDir(cgroupID))
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
		del(dp.Ifaces, ifaceKey(r, ifc.Index))
	}
	for _, s := range r.Local {
		a, err := netip.ParseAddr(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("recorded address %q: %w", s, err))
			continue
		}
		del(dp.LocalAddrs, localKey(r, a))
	}
	for _, fam := range datapath.Families {
		for rule := datapath.Rule(0); rule < datapath.RuleMax; rule++ {
			del(dp.Counters, datapath.CounterKey{Netns: r.NetnsCookie, Rule: rule, Family: fam})
		}
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
		if err := it.Err(); err != nil {
			errs = append(errs, err)
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
	s, err := openStore(o, false)
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
	o.log().Info("detached", "pod", r.ID)
	return s.pruneIfEmpty(o.log())
}

// detachLocked undoes what the record says was done; parts already gone (the
// netns deleted, the cgroup removed) are skipped. It is the one way a pod's
// state is removed: by detach, by reconcile, and when an attach fails. The
// record goes last, so a detach that fails can be retried.
func detachLocked(o Options, s *store, r *Record) error {
	var errs []error
	dir := s.podDir(r.ID)
	ns := openSameNetns(r)
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
	if d, derr := s.datapath(nil, o); derr == nil {
		errs = append(errs, deleteEntries(d, r))
	} else if !errors.Is(derr, os.ErrNotExist) {
		errs = append(errs, derr)
	}
	if r.ProxyCounted {
		errs = append(errs, releaseProxy(s, r.ProxyCgroupID))
	} else if r.ProxyCgroupID != 0 {
		// An attach that stopped between attaching the proxy's links and
		// counting itself: the links go if no pod counts on them.
		if n, err := s.proxyRefs(r.ProxyCgroupID, 0); err != nil {
			errs = append(errs, err)
		} else if n == 0 {
			errs = append(errs, removeLinks(s.proxyDir(r.ProxyCgroupID)))
		}
	}
	errs = append(errs, s.dropOwner(ownerNetns, r.NetnsCookie, r.ID), s.dropOwner(ownerCgroup, r.CgroupID, r.ID))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("detaching pod %s: %w", r.ID, err)
	}
	return s.del(r.ID)
}

// openSameNetns opens the record's netns if its path still names the same
// namespace (by cookie), else returns -1: a path reused by another namespace
// must never be touched.
func openSameNetns(r *Record) netns.NsHandle {
	h, err := podnet.Open(r.Netns)
	if err != nil {
		return -1
	}
	if c, cerr := podnet.Cookie(h); cerr != nil || c != r.NetnsCookie {
		h.Close()
		return -1
	}
	return h
}

func undoNetns(ns netns.NsHandle, r *Record) error {
	err := errors.Join(r.Route.Remove(ns, unix.AF_INET, r.RuleCreated, r.RouteCreated),
		r.Route.Remove(ns, unix.AF_INET6, r.Rule6Created, r.Route6Created))
	for name, old := range r.Sysctls {
		if _, serr := podnet.SetSysctl(ns, name, old); serr != nil {
			err = errors.Join(err, serr)
		}
	}
	return err
}
