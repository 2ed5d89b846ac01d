package topology

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
)

// The second link a test may add to a pod: eth1, 10.78.0.2/24 in the pod,
// 10.78.0.1/24 on R.
var (
	Pod2IP  = net.IPv4(10, 78, 0, 2).To4()
	Peer2IP = net.IPv4(10, 78, 0, 1).To4()
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
	hp, hr, peerNS, done, err := p.handles()
	if err != nil {
		return err
	}
	defer done()
	veth := netlink.NewVeth(netlink.LinkAttrs{Name: SecondIfName})
	veth.PeerName = SecondIfName
	veth.PeerNamespace = netlink.NsFd(int(peerNS))
	if err := hp.LinkAdd(veth); err != nil {
		return fmt.Errorf("second veth: %w", err)
	}
	for _, side := range []struct {
		h  *netlink.Handle
		ip net.IP
	}{{hp, Pod2IP}, {hr, Peer2IP}} {
		l, err := side.h.LinkByName(SecondIfName)
		if err != nil {
			return err
		}
		if err := side.h.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: side.ip, Mask: net.CIDRMask(24, 32)}}); err != nil {
			return fmt.Errorf("second address %s: %w", side.ip, err)
		}
		if err := side.h.LinkSetUp(l); err != nil {
			return err
		}
	}
	return nil
}
