package redirect

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// refreshLocked brings an attached pod up to date with its namespace as it is
// now: interfaces added since attach get the tc programs (inbound on them is
// captured as under iptables, whose rules cover every interface), removed ones
// are forgotten, and the local-address set follows the addresses. It reports
// whether anything changed. The record is written after every change, so that
// what is attached is always recorded, even if a later change fails.
func refreshLocked(o Options, s *store, r *Record) (changed bool, err error) {
	ns, err := podnet.Open(r.Netns)
	if err != nil {
		return false, err
	}
	defer ns.Close()
	if c, err := podnet.Cookie(ns); err != nil || c != r.NetnsCookie {
		return false, fmt.Errorf("netns %s is another namespace now", r.Netns)
	}
	info, err := podnet.Inspect(ns)
	if err != nil {
		return false, err
	}
	dp, err := s.datapath(nil, o)
	if err != nil {
		return false, err
	}
	defer func() {
		if changed {
			err = errors.Join(err, s.put(r))
		}
	}()
	dir := s.podDir(r.ID)

	now := map[int]podnet.Iface{}
	for _, ifc := range info.Ifaces {
		now[ifc.Index] = ifc
	}
	// Interfaces gone: their tc attachments went with them.
	var keepIf []Iface
	var errs []error
	for _, ifc := range r.Ifaces {
		if _, ok := now[ifc.Index]; ok {
			keepIf = append(keepIf, ifc)
			continue
		}
		changed = true
		errs = append(errs, deleteKey(dp.Ifaces, ifaceKey(r, ifc.Index)))
		var keepTC []TCAttachment
		for _, a := range r.TC {
			if a.Ifindex == ifc.Index {
				errs = append(errs, detachTC(ns, a, dir))
				continue
			}
			keepTC = append(keepTC, a)
		}
		r.TC = keepTC
	}
	r.Ifaces = keepIf
	if err := errors.Join(errs...); err != nil {
		return changed, err
	}
	// Interfaces new, or whose addresses for REDIRECT changed.
	tcHooks, err := dp.Hooks(datapath.ScopeTC)
	if err != nil {
		return changed, err
	}
	for _, ifc := range info.Ifaces {
		x := recordIface(ifc)
		i := slices.IndexFunc(r.Ifaces, func(y Iface) bool { return y.Index == ifc.Index })
		if i >= 0 && r.Ifaces[i] == x {
			continue
		}
		changed = true
		if err := dp.Ifaces.Put(ifaceKey(r, ifc.Index), ifaceInfo(ifc)); err != nil {
			return changed, err
		}
		if i >= 0 {
			r.Ifaces[i] = x
			continue
		}
		r.Ifaces = append(r.Ifaces, x)
		if err := attachIface(ns, o.TCMode, tcHooks, x, dir, s, r); err != nil {
			return changed, err
		}
		o.log().Info("captured a new interface", "pod", r.ID, "iface", ifc.Name)
	}
	// Local addresses.
	want := map[string]netip.Addr{}
	for _, a := range info.Local {
		want[a.String()] = a
	}
	var keepLocal []string
	for _, a := range r.Local {
		if _, ok := want[a]; ok {
			keepLocal = append(keepLocal, a)
			delete(want, a)
			continue
		}
		changed = true
		ad, err := netip.ParseAddr(a)
		if err != nil {
			return changed, fmt.Errorf("pod %s: recorded address %q: %w", r.ID, a, err)
		}
		if err := deleteKey(dp.LocalAddrs, localKey(r, ad)); err != nil {
			return changed, err
		}
	}
	r.Local = keepLocal
	for str, a := range want {
		changed = true
		if err := dp.LocalAddrs.Put(localKey(r, a), uint8(1)); err != nil {
			return changed, err
		}
		r.Local = append(r.Local, str)
	}
	// The sources redirected sockets bind (an address gained later, DAD
	// finished...).
	before := *r
	r.setPod(info)
	if r.PodIP != before.PodIP || r.PodIP6 != before.PodIP6 || r.PodLL6 != before.PodLL6 || r.PodLLIndex != before.PodLLIndex {
		changed = true
		if err := dp.Pods.Put(r.NetnsCookie, podInfo(info)); err != nil {
			return changed, err
		}
	}
	return changed, nil
}

// deleteKey deletes a map entry; one already gone is fine.
func deleteKey(m *ebpf.Map, k any) error {
	if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return err
	}
	return nil
}

// Refresh brings one attached pod up to date with its namespace (new
// interfaces and addresses); Reconcile does it for every healthy pod.
func Refresh(o Options, id string) (bool, error) {
	if err := ValidatePodID(id); err != nil {
		return false, err
	}
	s, err := openStore(o, false)
	if err != nil {
		return false, err
	}
	defer s.Close()
	r, err := s.get(id)
	if err != nil {
		return false, err
	}
	if r == nil {
		return false, fmt.Errorf("pod %s: %w", id, ErrNotAttached)
	}
	if r.State != stateAttached {
		return false, fmt.Errorf("pod %s: attach has not finished; reconcile first", id)
	}
	return refreshLocked(o, s, r)
}
