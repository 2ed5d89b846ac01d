// Package podnet inspects and changes a pod's network namespace: its
// addresses, the policy route of the reference, and sysctls. Namespace
// switches happen only on a locked OS thread, and only where no netns-fd API
// exists (sysctls, the netns cookie, tcx attachment).
package podnet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// nsGetNSType is NS_GET_NSTYPE from <linux/nsfs.h>.
const nsGetNSType = 0xb703

// Open opens a network namespace file (/run/netns/NAME, /proc/PID/ns/net) and
// checks that it is one.
func Open(path string) (netns.NsHandle, error) {
	if path == "" {
		return -1, errors.New("no netns path given")
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("netns %s: %w", path, err)
	}
	t, err := unix.IoctlRetInt(fd, nsGetNSType)
	if err != nil || t != unix.CLONE_NEWNET {
		unix.Close(fd)
		return -1, fmt.Errorf("netns %s: not a network namespace file", path)
	}
	return netns.NsHandle(fd), nil
}

// Do runs fn with the calling goroutine's thread inside ns. If the thread
// cannot be switched back it is left locked, so Go retires it instead of
// reusing a thread in the wrong namespace.
func Do(ns netns.NsHandle, fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("reading the current netns: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("entering netns: %w", err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		return errors.Join(ferr, fmt.Errorf("leaving netns: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// Cookie returns the namespace's cookie, the key every map uses for the pod.
func Cookie(ns netns.NsHandle) (uint64, error) {
	var cookie uint64
	err := Do(ns, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		buf := make([]byte, 8)
		if err := getsockoptBytes(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE, buf); err != nil {
			return fmt.Errorf("SO_NETNS_COOKIE (kernel >= 5.14 needed): %w", err)
		}
		cookie = nativeUint64(buf)
		return nil
	})
	return cookie, err
}

// Iface is a non-loopback interface of the pod and its addresses.
type Iface struct {
	Index int
	Name  string
	// Addrs are its IPv4 addresses, primary (the first, the one REDIRECT
	// uses) first.
	Addrs []netip.Addr
	// Global6 are its global (and unique local) IPv6 addresses, in the
	// kernel's order: REDIRECT uses the first for a global destination.
	Global6 []netip.Addr
	// LinkLocal6 are its link-local ones: REDIRECT uses the first for a
	// link-local destination.
	LinkLocal6 []netip.Addr
}

// Info is what the datapath needs to know about a pod's namespace.
type Info struct {
	Ifaces []Iface
	// PodIP is the primary address of the interface holding the default route
	// (else of the first interface with one): the source a redirected
	// outbound socket would have used.
	PodIP netip.Addr
	// PodIP6 is the same for IPv6 (the IPv6 default route's interface, else
	// the IPv4 one's, else the first with a global address); PodLL6 the
	// link-local address of that interface, whose index is PodLLIndex.
	PodIP6     netip.Addr
	PodLL6     netip.Addr
	PodLLIndex int
	// Local is every address the namespace owns, of both families, on any
	// interface (IPv6 link-local ones included), but tentative ones (DAD not
	// done): the kernel does not route those locally yet.
	Local []netip.Addr
}

// Inspect reads the namespace's interfaces and addresses.
func Inspect(ns netns.NsHandle) (Info, error) {
	var info Info
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return info, fmt.Errorf("netlink in pod netns: %w", err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return info, fmt.Errorf("listing links: %w", err)
	}
	byIndex := map[int]*Iface{}
	for _, l := range links {
		a := l.Attrs()
		addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return info, fmt.Errorf("listing addresses of %s: %w", a.Name, err)
		}
		ifc := Iface{Index: a.Index, Name: a.Name}
		var secondary []netip.Addr
		for _, ad := range addrs {
			ip, ok := netip.AddrFromSlice(ad.IP)
			if !ok {
				continue
			}
			ip = ip.Unmap()
			if ad.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) != 0 {
				continue
			}
			info.Local = append(info.Local, ip)
			switch {
			case ip.Is4() && ad.Flags&unix.IFA_F_SECONDARY != 0:
				secondary = append(secondary, ip)
			case ip.Is4():
				ifc.Addrs = append(ifc.Addrs, ip)
			case ip.IsLinkLocalUnicast():
				ifc.LinkLocal6 = append(ifc.LinkLocal6, ip)
			case ip.IsGlobalUnicast():
				ifc.Global6 = append(ifc.Global6, ip)
			}
		}
		ifc.Addrs = append(ifc.Addrs, secondary...)
		if a.Flags&net.FlagLoopback != 0 {
			continue
		}
		info.Ifaces = append(info.Ifaces, ifc)
	}
	for i := range info.Ifaces {
		byIndex[info.Ifaces[i].Index] = &info.Ifaces[i]
	}
	def4, err := defaultRouteLink(h, netlink.FAMILY_V4)
	if err != nil {
		return info, err
	}
	def6, err := defaultRouteLink(h, netlink.FAMILY_V6)
	if err != nil {
		return info, err
	}
	first := func(pick func(*Iface) []netip.Addr, prefer ...int) (netip.Addr, int) {
		for _, idx := range prefer {
			if ifc := byIndex[idx]; ifc != nil && len(pick(ifc)) > 0 {
				return pick(ifc)[0], idx
			}
		}
		for i := range info.Ifaces {
			if as := pick(&info.Ifaces[i]); len(as) > 0 {
				return as[0], info.Ifaces[i].Index
			}
		}
		return netip.Addr{}, 0
	}
	info.PodIP, _ = first(func(i *Iface) []netip.Addr { return i.Addrs }, def4)
	var at int
	info.PodIP6, at = first(func(i *Iface) []netip.Addr { return i.Global6 }, def6, def4)
	if at == 0 {
		at = def4
	}
	info.PodLL6, info.PodLLIndex = first(func(i *Iface) []netip.Addr { return i.LinkLocal6 }, at, def4)
	return info, nil
}

// defaultRouteLink is the interface of the family's default route in the
// main table, 0 if none.
func defaultRouteLink(h *netlink.Handle, family int) (int, error) {
	routes, err := h.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return 0, fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil || r.Dst.IP.IsUnspecified() {
			if r.LinkIndex != 0 {
				return r.LinkIndex, nil
			}
			for _, nh := range r.MultiPath {
				return nh.LinkIndex, nil
			}
		}
	}
	return 0, nil
}

// PolicyRoute is the reference's inpod-routes.sh (and inpod-routes6.sh):
// marked replies are delivered locally through lo.
type PolicyRoute struct {
	Mark, Mask uint32
	Table      int
	Priority   int
}

func (p PolicyRoute) rule(family int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = family
	r.Mark = p.Mark
	mask := p.Mask
	r.Mask = &mask
	r.Table = p.Table
	r.Priority = p.Priority
	return r
}

func (p PolicyRoute) route(family int) *netlink.Route {
	dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	if family == unix.AF_INET6 {
		dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &netlink.Route{
		Family:    family,
		Type:      unix.RTN_LOCAL,
		Dst:       dst,
		LinkIndex: 1, // lo
		Table:     p.Table,
		Scope:     netlink.SCOPE_HOST,
	}
}

func familyName(family int) string {
	if family == unix.AF_INET6 {
		return "IPv6"
	}
	return "IPv4"
}

// Install adds the family's rule and route (unix.AF_INET or AF_INET6). It
// reports which of them it created, so that Remove takes away only those (an
// existing identical one is shared).
func (p PolicyRoute) Install(ns netns.NsHandle, family int) (rule, route bool, err error) {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return false, false, err
	}
	defer h.Close()
	if err := h.RuleAdd(p.rule(family)); err == nil {
		rule = true
	} else if !errors.Is(err, unix.EEXIST) {
		return false, false, fmt.Errorf("adding %s ip rule fwmark %#x/%#x lookup %d: %w", familyName(family), p.Mark, p.Mask, p.Table, err)
	}
	if err := h.RouteAdd(p.route(family)); err == nil {
		route = true
	} else if !errors.Is(err, unix.EEXIST) {
		if rule {
			_ = h.RuleDel(p.rule(family)) // best effort: the caller reports the failure
		}
		return false, false, fmt.Errorf("adding %s local route %s dev lo table %d: %w", familyName(family), p.route(family).Dst, p.Table, err)
	}
	return rule, route, nil
}

// Remove deletes what Install created.
func (p PolicyRoute) Remove(ns netns.NsHandle, family int, rule, route bool) error {
	if !rule && !route {
		return nil
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	var errs []error
	if route {
		if err := h.RouteDel(p.route(family)); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("removing %s local route table %d: %w", familyName(family), p.Table, err))
		}
	}
	if rule {
		if err := h.RuleDel(p.rule(family)); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("removing %s ip rule lookup %d: %w", familyName(family), p.Table, err))
		}
	}
	return errors.Join(errs...)
}

// SetSysctl writes a /proc/sys/net value inside the namespace and returns the
// old one. (/proc/sys/net is resolved against the opening thread's netns.)
func SetSysctl(ns netns.NsHandle, name, value string) (old string, err error) {
	path := "/proc/sys/" + strings.ReplaceAll(name, ".", "/")
	err = Do(ns, func() error {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		old = strings.TrimSpace(string(b))
		return os.WriteFile(path, []byte(value), 0o644)
	})
	if err != nil {
		return "", fmt.Errorf("sysctl %s=%s in pod netns: %w", name, value, err)
	}
	return old, nil
}
