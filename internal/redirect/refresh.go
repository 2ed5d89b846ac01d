package redirect

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// refreshLocked brings an attached pod up to date with its namespace as it is
// now: interfaces added since attach get the tc programs (inbound on them is
// captured as under iptables, whose rules cover every interface), removed ones
// are forgotten, and the local-address set follows the addresses. It reports
// whether anything changed.
func refreshLocked(o Options, s *store, r *Record) (bool, error) {
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
	dp, err := s.datapath(&o.Config, o.log())
	if err != nil {
		return false, err
	}
	changed := false
	dir := s.podDir(r.ID)

	now := map[int]podnet.Iface{}
	for _, ifc := range info.Ifaces {
		now[ifc.Index] = ifc
	}
	// Interfaces gone: their tc attachments went with them.
	var keepIf []Iface
	for _, ifc := range r.Ifaces {
		if _, ok := now[ifc.Index]; ok {
			keepIf = append(keepIf, ifc)
			continue
		}
		changed = true
		_ = dp.Ifaces.Delete(datapath.IfaceKey{Netns: r.NetnsCookie, Ifindex: uint32(ifc.Index)})
		var keepTC []TCAttachment
		for _, a := range r.TC {
			if a.Ifindex == ifc.Index {
				_ = detachTC(ns, a, dir)
				continue
			}
			keepTC = append(keepTC, a)
		}
		r.TC = keepTC
	}
	r.Ifaces = keepIf
	// Interfaces new, or whose primary address changed.
	for _, ifc := range info.Ifaces {
		var v datapath.IfaceInfo
		primary := ""
		if len(ifc.Addrs) > 0 {
			v.PrimaryIp = ip4(ifc.Addrs[0])
			primary = ifc.Addrs[0].String()
		}
		i := slices.IndexFunc(r.Ifaces, func(x Iface) bool { return x.Index == ifc.Index })
		if i >= 0 && r.Ifaces[i].Primary == primary {
			continue
		}
		changed = true
		if err := dp.Ifaces.Put(datapath.IfaceKey{Netns: r.NetnsCookie, Ifindex: uint32(ifc.Index)}, v); err != nil {
			return changed, err
		}
		if i >= 0 {
			r.Ifaces[i].Primary = primary
			continue
		}
		r.Ifaces = append(r.Ifaces, Iface{Index: ifc.Index, Name: ifc.Name, Primary: primary})
		mode := o.TCMode
		if len(r.TC) > 0 {
			mode = r.TC[0].Mode // one pod, one kind of attachment
		}
		for _, ingress := range []bool{true, false} {
			a, err := attachTC(ns, mode, TCAttachment{Ifindex: ifc.Index, Iface: ifc.Name, Ingress: ingress}, tcProg(dp, ingress), dir)
			if err != nil {
				_ = s.put(r)
				return changed, err
			}
			r.TC = append(r.TC, a)
			if err := s.put(r); err != nil {
				return changed, err
			}
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
		if ad, err := netip.ParseAddr(a); err == nil {
			_ = dp.LocalAddrs.Delete(datapath.LocalKey{Netns: r.NetnsCookie, Addr: ip4(ad)})
		}
	}
	for s, a := range want {
		changed = true
		if err := dp.LocalAddrs.Put(datapath.LocalKey{Netns: r.NetnsCookie, Addr: ip4(a)}, uint8(1)); err != nil {
			return changed, err
		}
		keepLocal = append(keepLocal, s)
	}
	r.Local = keepLocal
	if info.PodIP.IsValid() && info.PodIP.String() != r.PodIP {
		changed = true
		r.PodIP = info.PodIP.String()
		if err := dp.Pods.Put(r.NetnsCookie, datapath.PodInfo{PodIp: ip4(info.PodIP)}); err != nil {
			return changed, err
		}
	}
	if changed {
		return true, s.put(r)
	}
	return false, nil
}

// Refresh brings one attached pod up to date with its namespace (new
// interfaces and addresses); Reconcile does it for every healthy pod.
func Refresh(o Options, id string) (bool, error) {
	if err := ValidatePodID(id); err != nil {
		return false, err
	}
	s, err := openStore(o.Root)
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
