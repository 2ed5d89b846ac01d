// Package topology builds throwaway pods for the differential tests: a pod network
// namespace and a peer namespace ("R") joined by a veth, a pod cgroup and a proxy cgroup
// (cgroup v2), and a per-run bpffs mount. Everything it creates carries a run id made of
// the pid and random bits, so debris of an earlier run, or a concurrent run, never
// collides with this one, and everything is removed again by Close, even after a failure
// half way through.
package topology

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// The addressing plan every pod gets: dual-stack, as a default Istio
// installation captures both families.
var (
	PodIP          = net.IPv4(10, 77, 0, 2).To4() // primary address of the pod's eth0
	PodSecondaryIP = net.IPv4(10, 77, 0, 3).To4() // secondary address, same subnet
	PeerIP         = net.IPv4(10, 77, 0, 1).To4() // R, the pod's default gateway
	ProbeIP        = net.IPv4(169, 254, 7, 127).To4()
	RemoteIP       = net.IPv4(10, 77, 9, 9).To4() // a "remote service" reached through R

	PodIP6          = net.ParseIP("fd00:77::2") // the pod's global IPv6 address (the first: REDIRECT's)
	PodSecondaryIP6 = net.ParseIP("fd00:77::3")
	PodLinkLocal6   = net.ParseIP("fe80::2") // fixed, so that records compare
	PeerIP6         = net.ParseIP("fd00:77::1")
	PeerLinkLocal6  = net.ParseIP("fe80::1")
	ProbeIP6        = net.ParseIP("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
	RemoteIP6       = net.ParseIP("fd00:99::9")
)

func prefix(ip net.IP, bits int) *net.IPNet {
	n := 32
	if ip.To4() == nil {
		n = 128
	}
	return &net.IPNet{IP: ip, Mask: net.CIDRMask(bits, n)}
}

const (
	// PodIfName is the pod's interface; PeerIfName is R's end of the veth.
	PodIfName  = "eth0"
	PeerIfName = "eth0"

	runRootDir = "/run/ebpf-redirect-test"
	cgroupBase = "ebpf-redirect-test"
)

// Run owns everything one harness run creates: its cgroup subtree, its bpffs mount and
// its pods. Create it with NewRun and always Close it.
type Run struct {
	ID        string
	CgroupFS  string // the cgroup2 mount point
	CgroupDir string // <cg2>/ebpf-redirect-test/<id>
	Dir       string // /run/ebpf-redirect-test/<id>
	BPFFS     string // a bpffs mounted for this run

	lock *os.File // flock held for the run's lifetime: how SweepStale tells live runs

	mu     sync.Mutex
	pods   []*Pod
	next   int
	closed bool
}

// Pod is one throwaway pod: its namespaces and cgroups.
type Pod struct {
	N          int
	ID         string // unique pod id, also handed to ebpf-redirect as --pod-id
	NetNS      string // name of the pod netns (a file under /run/netns)
	PeerNetNS  string // name of R's netns
	PodCgroup  string // cgroup v2 directory of the pod's processes
	ProxyCgrp  string // cgroup v2 directory of the proxy
	PeerCgroup string // cgroup v2 directory of R's processes
	Dir        string // <run cgroup dir>/<n>

	run       *Run
	netnsMade []string
	cgMade    []string
	closed    bool
}

// NetNSPath is the bind-mount path of the pod's netns.
func (p *Pod) NetNSPath() string { return netnsPath(p.NetNS) }

// PeerNetNSPath is the bind-mount path of R's netns.
func (p *Pod) PeerNetNSPath() string { return netnsPath(p.PeerNetNS) }

func netnsPath(name string) string { return filepath.Join("/run/netns", name) }

// NewRun prepares a run: picks an id, finds (or mounts) cgroup v2, creates the run's
// cgroup directory and mounts a fresh bpffs. On error nothing is left behind.
func NewRun() (r *Run, err error) {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, err
	}
	// Short: it ends up in netns names, cgroup paths and pod ids.
	id := fmt.Sprintf("%x%s", os.Getpid(), hex.EncodeToString(b[:]))
	if err := SweepStale(); err != nil {
		slog.Warn("removing debris of dead test runs", "err", err)
	}
	r = &Run{ID: id, Dir: filepath.Join(runRootDir, id)}
	defer func() {
		if err != nil {
			r.Close()
			r = nil
		}
	}()
	if err := os.MkdirAll(r.Dir, 0o700); err != nil {
		return r, err
	}
	if r.lock, err = lockRunDir(r.Dir, true); err != nil {
		return r, err
	}
	cg, err := cgroup2Mount()
	if err != nil {
		return r, err
	}
	r.CgroupFS = cg
	r.CgroupDir = filepath.Join(cg, cgroupBase, id)
	if err := os.MkdirAll(r.CgroupDir, 0o755); err != nil {
		return r, fmt.Errorf("cgroup dir: %w", err)
	}
	bpffs := filepath.Join(r.Dir, "bpffs")
	if err := os.Mkdir(bpffs, 0o700); err != nil {
		return r, err
	}
	if err := unix.Mount("bpf", bpffs, "bpf", 0, "mode=0700"); err != nil {
		return r, fmt.Errorf("mount bpffs on %s: %w", bpffs, err)
	}
	r.BPFFS = bpffs
	return r, nil
}

// cgroup2Mount returns a cgroup v2 mount point: an existing one from mountinfo, else one
// mounted under /run (left mounted: it is harmless and other runs may share it).
func cgroup2Mount() (string, error) {
	if p, err := findCgroup2(); err == nil && p != "" {
		return p, nil
	}
	dir := filepath.Join(runRootDir, "cgroup2")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	if p, _ := findCgroup2(); p == dir {
		return dir, nil
	}
	if err := unix.Mount("cgroup2", dir, "cgroup2", 0, ""); err != nil {
		return "", fmt.Errorf("no cgroup2 mount and mounting one on %s failed: %w", dir, err)
	}
	return dir, nil
}

func findCgroup2() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent maj:min root mountpoint opts [optional...] - fstype source superopts
		line := sc.Text()
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) >= 5 && len(qf) >= 1 && qf[0] == "cgroup2" && pf[3] == "/" {
			return unescapeMountinfo(pf[4]), nil
		}
	}
	return "", sc.Err()
}

// unescapeMountinfo undoes the octal escapes (\040 for space...) of mountinfo paths.
func unescapeMountinfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// NewPod builds the next pod of the run. On error whatever was built is torn down.
func (r *Run) NewPod() (p *Pod, err error) {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, errors.New("run closed")
	}
	r.next++
	n := r.next
	p = &Pod{
		N:         n,
		ID:        fmt.Sprintf("erd%s-%d", r.ID, n),
		NetNS:     fmt.Sprintf("erd%sp%d", r.ID, n),
		PeerNetNS: fmt.Sprintf("erd%sr%d", r.ID, n),
		Dir:       filepath.Join(r.CgroupDir, fmt.Sprint(n)),
		run:       r,
	}
	r.pods = append(r.pods, p)
	r.mu.Unlock()

	defer func() {
		if err != nil {
			if cerr := p.Close(); cerr != nil {
				slog.Warn("tearing down a half-built pod", "pod", p.ID, "err", cerr)
			}
			p = nil
		}
	}()
	p.PodCgroup = filepath.Join(p.Dir, "pod")
	p.ProxyCgrp = filepath.Join(p.Dir, "proxy")
	p.PeerCgroup = filepath.Join(p.Dir, "peer")
	for _, d := range []string{p.Dir, p.PodCgroup, p.ProxyCgrp, p.PeerCgroup} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return p, fmt.Errorf("cgroup: %w", err)
		}
		p.cgMade = append(p.cgMade, d)
	}
	for _, ns := range []string{p.NetNS, p.PeerNetNS} {
		if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
			return p, fmt.Errorf("ip netns add %s: %v: %s", ns, err, out)
		}
		p.netnsMade = append(p.netnsMade, ns)
		if err := ipv6Defaults(netnsPath(ns)); err != nil {
			return p, err
		}
	}
	if err := p.wire(); err != nil {
		return p, err
	}
	return p, nil
}

// ipv6Defaults makes the interfaces of a new namespace get no automatic
// link-local address and no duplicate address detection: every IPv6 address is
// the plan's, and usable at once (a test waits for nothing it did not ask).
func ipv6Defaults(nsPath string) error {
	ns, err := podnet.Open(nsPath)
	if err != nil {
		return err
	}
	defer ns.Close()
	for _, kv := range [][2]string{
		{"net.ipv6.conf.default.addr_gen_mode", "1"},
		{"net.ipv6.conf.default.accept_dad", "0"},
		{"net.ipv6.conf.all.accept_dad", "0"},
		{"net.ipv6.conf.default.accept_ra", "0"},
	} {
		if _, err := podnet.SetSysctl(ns, kv[0], kv[1]); err != nil {
			return err
		}
	}
	return nil
}

// wire creates the veth and the addressing, through netlink handles bound to the two
// namespaces, so that the host namespace is never touched.
func (p *Pod) wire() error {
	// The primary IPv4 address must be added first: the secondary is then
	// flagged secondary. IPv6 lists the newest first: the secondary goes first.
	if err := p.AddLink(PodIfName,
		[]*net.IPNet{prefix(PodIP, 24), prefix(PodSecondaryIP, 24), prefix(PodSecondaryIP6, 64), prefix(PodIP6, 64), prefix(PodLinkLocal6, 64)},
		[]*net.IPNet{prefix(PeerIP, 24), prefix(ProbeIP, 32), prefix(RemoteIP, 32), prefix(PeerIP6, 64), prefix(ProbeIP6, 128), prefix(RemoteIP6, 128), prefix(PeerLinkLocal6, 64)},
	); err != nil {
		return err
	}
	hp, hr, _, done, err := p.handles()
	if err != nil {
		return err
	}
	defer done()
	for _, h := range []*netlink.Handle{hp, hr} {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := h.LinkSetUp(lo); err != nil {
			return err
		}
	}
	podLink, err := hp.LinkByName(PodIfName)
	if err != nil {
		return err
	}
	for _, gw := range []net.IP{PeerIP, PeerIP6} {
		if err := hp.RouteAdd(&netlink.Route{
			LinkIndex: podLink.Attrs().Index,
			Gw:        gw,
			Dst:       nil, // default
		}); err != nil {
			return fmt.Errorf("pod default route via %s: %w", gw, err)
		}
	}
	return nil
}

// handles opens netlink handles in the pod's and R's namespaces; done closes
// them (and R's namespace, which creating a veth peer there needs).
func (p *Pod) handles() (hp, hr *netlink.Handle, peerNS netns.NsHandle, done func(), err error) {
	podNS, err := netns.GetFromPath(p.NetNSPath())
	if err != nil {
		return nil, nil, -1, nil, err
	}
	defer podNS.Close()
	if peerNS, err = netns.GetFromPath(p.PeerNetNSPath()); err != nil {
		return nil, nil, -1, nil, err
	}
	if hp, err = netlink.NewHandleAt(podNS); err != nil {
		peerNS.Close()
		return nil, nil, -1, nil, err
	}
	if hr, err = netlink.NewHandleAt(peerNS); err != nil {
		hp.Close()
		peerNS.Close()
		return nil, nil, -1, nil, err
	}
	return hp, hr, peerNS, func() { hr.Close(); hp.Close(); peerNS.Close() }, nil
}

// Close tears the pod down: kills every process in its cgroups, removes the cgroups and
// deletes both namespaces. It is safe to call twice and reports every failure.
func (p *Pod) Close() error {
	if p.closed {
		return nil
	}
	p.closed = true
	var errs []error
	for i := len(p.cgMade) - 1; i >= 0; i-- {
		if err := removeCgroup(p.cgMade[i]); err != nil {
			errs = append(errs, err)
		}
	}
	for _, ns := range p.netnsMade {
		if _, err := os.Stat(netnsPath(ns)); errors.Is(err, os.ErrNotExist) {
			continue // deleted already (a test may delete a pod's netns)
		}
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del %s: %v: %s", ns, err, out))
		}
	}
	return errors.Join(errs...)
}

// removeCgroup kills what lives in a cgroup (and below), waits for it to empty and
// removes it.
func removeCgroup(dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	killCgroup(dir)
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := unix.Rmdir(dir)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("rmdir %s: %w", dir, err)
		}
		killCgroup(dir)
		time.Sleep(10 * time.Millisecond)
	}
}

// killCgroup uses cgroup.kill (Linux 5.14+), else SIGKILLs every pid listed.
func killCgroup(dir string) {
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0); err == nil {
		return
	}
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(b)) {
		var pid int
		if _, err := fmt.Sscan(f, &pid); err == nil && pid > 0 {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
	}
}

// Close tears down every pod of the run, unmounts the bpffs and removes the run's
// directories. Safe to call twice.
func (r *Run) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	pods := r.pods
	r.mu.Unlock()

	var errs []error
	for _, p := range pods {
		if err := p.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	bpffsGone := true
	if r.BPFFS != "" {
		if err := unix.Unmount(r.BPFFS, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", r.BPFFS, err))
			bpffsGone = false
		}
	}
	if r.CgroupDir != "" {
		if err := removeCgroup(r.CgroupDir); err != nil {
			errs = append(errs, err)
		}
		// Shared by every run: only removed when this was the last one.
		_ = unix.Rmdir(filepath.Dir(r.CgroupDir))
	}
	// Never walk into a bpffs that is still mounted: that would unlink its pins.
	if r.Dir != "" && bpffsGone {
		if err := os.RemoveAll(r.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	if r.lock != nil {
		r.lock.Close()
	}
	return errors.Join(errs...)
}

// PodCount is how many pods the run has built so far.
func (r *Run) PodCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.next
}
