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

// Options says where the pins live and what the rules are.
type Options struct {
	Root   string // a directory on bpffs; DefaultRoot if empty
	Config config.Config
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

// ErrAlreadyAttached and ErrNotAttached let callers tell these apart.
var (
	ErrAlreadyAttached = errors.New("already attached")
	ErrNotAttached     = errors.New("not attached")
)

// FaultEnv names an environment variable for tests: set to a step name
// ("maps", "route", "tc", "cgroup", "proxy", "done") it makes Attach fail just
// before that step, to prove the unwinding leaves nothing behind.
const FaultEnv = "EBPF_REDIRECT_FAULT_BEFORE"

func faultBefore(step string) bool { return os.Getenv(FaultEnv) == step }

// sysctlAcceptLocal lets lo accept the replies the egress program sends back
// in with a local source address (the 0x111 return path).
const sysctlAcceptLocal = "net.ipv4.conf.lo.accept_local"

func ip4(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:]) // network order in memory
}

func (o Options) route() podnet.PolicyRoute {
	return podnet.PolicyRoute{Mark: o.Config.ConnMark, Mask: o.Config.MarkMask, Table: o.Config.RouteTable, Priority: o.Config.RulePriority}
}

// Attach captures one pod. Either everything is attached and pinned, or
// nothing is (every step done is undone on failure), and no other pod is
// touched.
func Attach(ctx context.Context, o Options, p Pod) (err error) {
	if err := ValidatePodID(p.ID); err != nil {
		return err
	}
	if err := o.Config.Validate(); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	ns, err := podnet.Open(p.Netns)
	if err != nil {
		return err
	}
	defer ns.Close()
	cg, err := cgroup.Open(p.Cgroup)
	if err != nil {
		return err
	}
	var pcg cgroup.Cgroup
	if p.ProxyCgroup != "" {
		if pcg, err = cgroup.Open(p.ProxyCgroup); err != nil {
			return fmt.Errorf("proxy %w", err)
		}
		if pcg.ID == cg.ID {
			return fmt.Errorf("proxy cgroup %s is the pod's cgroup; the proxy must run outside the pod's cgroup", p.ProxyCgroup)
		}
	}
	cookie, err := podnet.Cookie(ns)
	if err != nil {
		return err
	}
	info, err := podnet.Inspect(ns)
	if err != nil {
		return err
	}
	if len(info.Ifaces) == 0 {
		return fmt.Errorf("netns %s has no interface besides lo to attach to", p.Netns)
	}

	s, err := openStore(o.Root)
	if err != nil {
		return err
	}
	defer s.Close()

	existing, err := s.all()
	if err != nil {
		return err
	}
	for _, r := range existing {
		switch {
		case r.ID == p.ID:
			return fmt.Errorf("pod %s: %w (netns %s, cgroup %s); detach it first", p.ID, ErrAlreadyAttached, r.Netns, r.Cgroup)
		case r.NetnsCookie == cookie:
			return fmt.Errorf("netns %s is already attached as pod %s", p.Netns, r.ID)
		case r.CgroupID == cg.ID:
			return fmt.Errorf("cgroup %s is already attached as pod %s", p.Cgroup, r.ID)
		}
	}
	if _, err := os.Stat(s.podDir(p.ID)); err == nil {
		return fmt.Errorf("pod %s: %w: debris of an interrupted attach in %s; run detach first", p.ID, ErrAlreadyAttached, s.podDir(p.ID))
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	dp, err := s.datapath(&o.Config)
	if err != nil {
		return err
	}

	rec := &Record{
		ID: p.ID, State: stateAttaching, Netns: p.Netns, Cgroup: p.Cgroup, ProxyCgroup: p.ProxyCgroup,
		NetnsCookie: cookie, CgroupID: cg.ID, ProxyCgroupID: pcg.ID, AttachedAt: time.Now().UTC(),
		Route: o.route(),
	}
	if info.PodIP.IsValid() {
		rec.PodIP = info.PodIP.String()
	}
	for _, ifc := range info.Ifaces {
		r := Iface{Index: ifc.Index, Name: ifc.Name}
		if len(ifc.Addrs) > 0 {
			r.Primary = ifc.Addrs[0].String()
		}
		rec.Ifaces = append(rec.Ifaces, r)
	}
	for _, a := range info.Local {
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
		if faultBefore(name) {
			return fmt.Errorf("injected fault before %s (%s)", name, FaultEnv)
		}
		return nil
	}

	// The record goes first so that a process killed half way leaves a trace
	// that detach can follow.
	if err = s.put(rec); err != nil {
		return fmt.Errorf("recording pod %s: %w", p.ID, err)
	}
	undo = append(undo, func() error { return s.del(p.ID) })

	if err = step("maps"); err != nil {
		return err
	}
	undo = append(undo, func() error { return deleteEntries(dp, rec) })
	if err = putEntries(dp, rec, info); err != nil {
		return err
	}

	if err = step("route"); err != nil {
		return err
	}
	if rec.RuleCreated, rec.RouteCreated, err = rec.Route.Install(ns); err != nil {
		return err
	}
	undo = append(undo, func() error { return rec.Route.Remove(ns, rec.RuleCreated, rec.RouteCreated) })
	if rec.AcceptLocal, err = podnet.SetSysctl(ns, sysctlAcceptLocal, "1"); err != nil {
		return err
	}
	undo = append(undo, func() error { _, err := podnet.SetSysctl(ns, sysctlAcceptLocal, rec.AcceptLocal); return err })
	if err = s.put(rec); err != nil {
		return err
	}

	dir := s.podDir(p.ID)
	if err = os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	undo = append(undo, func() error { return removeLinks(dir) })

	if err = step("tc"); err != nil {
		return err
	}
	for _, ifc := range rec.Ifaces {
		for _, h := range []struct {
			name   string
			prog   *ebpf.Program
			attach ebpf.AttachType
		}{{"ingress", dp.PodIngress, ebpf.AttachTCXIngress}, {"egress", dp.PodEgress, ebpf.AttachTCXEgress}} {
			var l link.Link
			// AttachTCX resolves the ifindex in the calling thread's netns.
			err = podnet.Do(ns, func() error {
				var aerr error
				l, aerr = link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: h.prog, Attach: h.attach})
				return aerr
			})
			if err != nil {
				return fmt.Errorf("attaching tcx %s on %s: %w", h.name, ifc.Name, err)
			}
			err = pinLink(l, filepath.Join(dir, fmt.Sprintf("tcx_%s_%d", h.name, ifc.Index)))
			if err != nil {
				return err
			}
		}
	}

	if err = step("cgroup"); err != nil {
		return err
	}
	for _, h := range []struct {
		name   string
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		{"cgroup_connect4", dp.PodConnect4, ebpf.AttachCGroupInet4Connect},
		{"cgroup_getpeername4", dp.PodGetpeername4, ebpf.AttachCgroupInet4GetPeername},
		{"cgroup_connect6", dp.PodConnect6, ebpf.AttachCGroupInet6Connect},
		{"cgroup_getpeername6", dp.PodGetpeername6, ebpf.AttachCgroupInet6GetPeername},
		{"cgroup_sockops", dp.PodSockops, ebpf.AttachCGroupSockOps},
		{"cgroup_skb_ingress", dp.PodSockIngress, ebpf.AttachCGroupInetIngress},
	} {
		var l link.Link
		l, err = link.AttachCgroup(link.CgroupOptions{Path: cg.Path, Attach: h.attach, Program: h.prog})
		if err != nil {
			return fmt.Errorf("attaching %s to %s: %w", h.name, cg.Path, err)
		}
		if err = pinLink(l, filepath.Join(dir, h.name)); err != nil {
			return err
		}
	}

	if pcg.ID != 0 {
		if err = step("proxy"); err != nil {
			return err
		}
		pin := s.proxyPin(pcg.ID)
		if _, serr := os.Stat(pin); serr != nil {
			if err = os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
				return err
			}
			var l link.Link
			l, err = link.AttachCgroup(link.CgroupOptions{Path: pcg.Path, Attach: ebpf.AttachCGroupGetsockopt, Program: dp.ProxyGetsockopt})
			if err != nil {
				return fmt.Errorf("attaching getsockopt to the proxy cgroup %s: %w", pcg.Path, err)
			}
			if err = pinLink(l, pin); err != nil {
				return err
			}
			undo = append(undo, func() error { return removeLinks(filepath.Dir(pin)) })
		}
	}

	if err = step("done"); err != nil {
		return err
	}
	rec.State = stateAttached
	if err = s.put(rec); err != nil {
		return err
	}
	o.log().Info("attached", "pod", p.ID, "netns", p.Netns, "cgroup", p.Cgroup, "ifaces", len(rec.Ifaces), "pod_ip", rec.PodIP)
	return nil
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
		path := filepath.Join(dir, e.Name())
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("opening %s: %w", path, err))
			continue
		}
		if err := l.Unpin(); err != nil {
			errs = append(errs, err)
		}
		l.Close() // last reference: the kernel detaches it
	}
	if len(errs) == 0 {
		if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
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
			// Links without a record: an attach that died before writing
			// it cannot happen (the record goes first), but clean it anyway.
			return removeLinks(s.podDir(id))
		}
		return fmt.Errorf("pod %s: %w", id, ErrNotAttached)
	}
	var errs []error
	// Links first: from here on nothing new is captured.
	if err := removeLinks(s.podDir(id)); err != nil {
		errs = append(errs, err)
	}
	if ns, nerr := podnet.Open(r.Netns); nerr == nil {
		// Only if the path still names the same namespace.
		if c, cerr := podnet.Cookie(ns); cerr == nil && c == r.NetnsCookie {
			errs = append(errs, undoNetns(ns, r))
		}
		ns.Close()
	}
	if d, derr := s.datapath(nil); derr == nil {
		errs = append(errs, deleteEntries(d, r))
	} else {
		errs = append(errs, derr)
	}
	if r.ProxyCgroupID != 0 {
		others, aerr := s.all()
		errs = append(errs, aerr)
		used := false
		for _, x := range others {
			used = used || (x.ID != id && x.ProxyCgroupID == r.ProxyCgroupID)
		}
		if !used {
			errs = append(errs, removeLinks(filepath.Dir(s.proxyPin(r.ProxyCgroupID))))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("detaching pod %s: %w", id, err)
	}
	if err := s.del(id); err != nil {
		return err
	}
	o.log().Info("detached", "pod", id)
	return s.pruneIfEmpty(o.log())
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

// List returns the records of every attached pod.
func List(o Options) ([]*Record, error) {
	s, err := openStore(o.Root)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	return s.all()
}
