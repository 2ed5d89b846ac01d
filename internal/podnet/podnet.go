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

// Iface is a non-loopback interface of the pod and its IPv4 addresses, primary
// (the first, the one REDIRECT uses) first.
type Iface struct {
	Index int
	Name  string
	Addrs []netip.Addr
}

// Info is what the datapath needs to know about a pod's namespace.
type Info struct {
	Ifaces []Iface
	// PodIP is the primary address of the interface holding the default route
	// (else of the first interface with one): the source a redirected
	// outbound socket would have used.
	PodIP netip.Addr
	// Local is every IPv4 address the namespace owns, on any interface.
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
		addrs, err := h.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return info, fmt.Errorf("listing addresses of %s: %w", a.Name, err)
		}
		var primary, secondary []netip.Addr
		for _, ad := range addrs {
			ip, ok := netip.AddrFromSlice(ad.IP.To4())
			if !ok {
				continue
			}
			info.Local = append(info.Local, ip)
			if ad.Flags&unix.IFA_F_SECONDARY != 0 {
				secondary = append(secondary, ip)
			} else {
				primary = append(primary, ip)
			}
		}
		if a.Flags&net.FlagLoopback != 0 {
			continue
		}
		info.Ifaces = append(info.Ifaces, Iface{Index: a.Index, Name: a.Name, Addrs: append(primary, secondary...)})
		byIndex[a.Index] = &info.Ifaces[len(info.Ifaces)-1]
	}
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return info, fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.IP.IsUnspecified()) && byIndex[r.LinkIndex] != nil && len(byIndex[r.LinkIndex].Addrs) > 0 {
			info.PodIP = byIndex[r.LinkIndex].Addrs[0]
			break
		}
	}
	if !info.PodIP.IsValid() {
		for _, ifc := range info.Ifaces {
			if len(ifc.Addrs) > 0 {
				info.PodIP = ifc.Addrs[0]
				break
			}
		}
	}
	return info, nil
}

// PolicyRoute is the reference's inpod-routes.sh: marked replies are
// delivered locally through lo.
type PolicyRoute struct {
	Mark, Mask uint32
	Table      int
	Priority   int
}

func (p PolicyRoute) rule() *netlink.Rule {
	r := netlink.NewRule()
	r.Family = unix.AF_INET
	r.Mark = p.Mark
	mask := p.Mask
	r.Mask = &mask
	r.Table = p.Table
	r.Priority = p.Priority
	return r
}

func (p PolicyRoute) route() *netlink.Route {
	return &netlink.Route{
		Family:    unix.AF_INET,
		Type:      unix.RTN_LOCAL,
		Dst:       &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
		LinkIndex: 1, // lo
		Table:     p.Table,
		Scope:     netlink.SCOPE_HOST,
	}
}

// Install adds the rule and the route. It reports which of them it created,
// so that Remove takes away only those (an existing identical one is shared).
func (p PolicyRoute) Install(ns netns.NsHandle) (rule, route bool, err error) {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return false, false, err
	}
	defer h.Close()
	if err := h.RuleAdd(p.rule()); err == nil {
		rule = true
	} else if !errors.Is(err, unix.EEXIST) {
		return false, false, fmt.Errorf("adding ip rule fwmark %#x/%#x lookup %d: %w", p.Mark, p.Mask, p.Table, err)
	}
	if err := h.RouteAdd(p.route()); err == nil {
		route = true
	} else if !errors.Is(err, unix.EEXIST) {
		if rule {
			_ = h.RuleDel(p.rule())
		}
		return false, false, fmt.Errorf("adding local route 0.0.0.0/0 dev lo table %d: %w", p.Table, err)
	}
	return rule, route, nil
}

// Remove deletes what Install created.
func (p PolicyRoute) Remove(ns netns.NsHandle, rule, route bool) error {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	var errs []error
	if route {
		if err := h.RouteDel(p.route()); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("removing local route table %d: %w", p.Table, err))
		}
	}
	if rule {
		if err := h.RuleDel(p.rule()); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("removing ip rule lookup %d: %w", p.Table, err))
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
