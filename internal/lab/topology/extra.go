package topology

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The second link a test may add to a pod: eth1, 10.78.0.2/24 and
// fd00:78::2/64 in the pod, 10.78.0.1/24 and fd00:78::1/64 on R.
var (
	Pod2IP   = net.IPv4(10, 78, 0, 2).To4()
	Peer2IP  = net.IPv4(10, 78, 0, 1).To4()
	Pod2IP6  = net.ParseIP("fd00:78::2")
	Peer2IP6 = net.ParseIP("fd00:78::1")
	Pod2LL6  = net.ParseIP("fe80::12")
	Peer2LL6 = net.ParseIP("fe80::11")
)

// SecondIfName is the name of the second link on both sides.
const SecondIfName = "eth1"

// AddCgroup creates a cgroup below the pod's directory (rel is relative to
// Dir: "staging", or "pod/sub" for a child of the pod's own cgroup) and
// returns its path. It is removed with the pod, before its parents.
func (p *Pod) AddCgroup(rel string) (string, error) {
	dir := filepath.Join(p.Dir, rel)
	if !strings.HasPrefix(dir, p.Dir+string(filepath.Separator)) {
		return "", fmt.Errorf("cgroup %q is not below the pod's directory", rel)
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", fmt.Errorf("cgroup: %w", err)
	}
	p.cgMade = append(p.cgMade, dir)
	return dir, nil
}

// MoveToCgroup moves a process (all its threads) into a cgroup.
func MoveToCgroup(pid int, dir string) error {
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(fmt.Sprint(pid)), 0); err != nil {
		return fmt.Errorf("moving pid %d to %s: %w", pid, dir, err)
	}
	return nil
}

// AddSecondInterface links the pod to R a second time (eth1 on both sides,
// Pod2IP and Peer2IP), as a CNI adding a network to a running pod would.
func (p *Pod) AddSecondInterface() error {
	return p.AddLink(SecondIfName, []*net.IPNet{prefix(Pod2IP, 24), prefix(Pod2IP6, 64), prefix(Pod2LL6, 64)},
		[]*net.IPNet{prefix(Peer2IP, 24), prefix(Peer2IP6, 64), prefix(Peer2LL6, 64)})
}

// AddLink links the pod to R with a veth of that name on both sides, with
// the given addresses (in order: the first is the primary), and returns once
// it is up on both.
func (p *Pod) AddLink(name string, podAddrs, peerAddrs []*net.IPNet) error {
	hp, hr, peerNS, done, err := p.handles()
	if err != nil {
		return err
	}
	defer done()
	veth := netlink.NewVeth(netlink.LinkAttrs{Name: name})
	veth.PeerName = name
	veth.PeerNamespace = netlink.NsFd(int(peerNS))
	if err := hp.LinkAdd(veth); err != nil {
		return fmt.Errorf("veth %s: %w", name, err)
	}
	for _, side := range []struct {
		h     *netlink.Handle
		addrs []*net.IPNet
	}{{hp, podAddrs}, {hr, peerAddrs}} {
		l, err := side.h.LinkByName(name)
		if err != nil {
			return err
		}
		for _, a := range side.addrs {
			// No duplicate address detection: usable at once.
			if err := side.h.AddrAdd(l, &netlink.Addr{IPNet: a, Flags: unix.IFA_F_NODAD}); err != nil {
				return fmt.Errorf("address %s on %s: %w", a, name, err)
			}
		}
		if err := side.h.LinkSetUp(l); err != nil {
			return err
		}
	}
	return waitUp(name, hp, hr)
}

// PeerRoute adds a route on R: dst through R's link of that name.
func (p *Pod) PeerRoute(dst *net.IPNet, dev string) error {
	_, hr, _, done, err := p.handles()
	if err != nil {
		return err
	}
	defer done()
	l, err := hr.LinkByName(dev)
	if err != nil {
		return err
	}
	return hr.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst})
}

// waitUp returns once the link of that name is operationally up (carrier
// on: both ends of the veth are up) in every namespace: until then the
// kernel drops what is sent on it.
func waitUp(name string, hs ...*netlink.Handle) error {
	deadline := time.Now().Add(10 * time.Second)
	for _, h := range hs {
		for {
			l, err := h.LinkByName(name)
			if err != nil {
				return err
			}
			if l.Attrs().OperState == netlink.OperUp {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("link %s is still %s after 10s", name, l.Attrs().OperState)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return nil
}
