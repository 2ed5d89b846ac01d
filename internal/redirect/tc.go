package redirect

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// TCMode selects how the tc programs are attached.
type TCMode string

const (
	// TCAuto uses tcx where the kernel has it (>= 6.6), else legacy.
	TCAuto TCMode = "auto"
	// TCX attaches with tcx links (pinned, multi-program, atomic update).
	TCX TCMode = "tcx"
	// TCLegacy attaches cls_bpf filters on a clsact qdisc through netlink,
	// for kernels without tcx.
	TCLegacy TCMode = "legacy"
)

// ParseTCMode accepts "auto", "tcx" and "legacy".
func ParseTCMode(s string) (TCMode, error) {
	switch m := TCMode(s); m {
	case TCAuto, TCX, TCLegacy:
		return m, nil
	case "":
		return TCAuto, nil
	}
	return "", fmt.Errorf("tc mode %q: want auto, tcx or legacy", s)
}

// TCAttachment is one tc program on one interface, as recorded for detach,
// health checks and upgrades.
type TCAttachment struct {
	Mode    TCMode `json:"mode"`
	Prog    string `json:"prog"` // the hook's program
	Ifindex int    `json:"ifindex"`
	Iface   string `json:"iface"`
	Ingress bool   `json:"ingress"`
	// Legacy only: the filter's priority and handle, and whether we added
	// the clsact qdisc (then detach removes it when our filters are gone).
	Priority     uint16 `json:"priority,omitempty"`
	Handle       uint32 `json:"handle,omitempty"`
	QdiscCreated bool   `json:"qdisc_created,omitempty"`
}

func (a TCAttachment) dir() string {
	if a.Ingress {
		return "ingress"
	}
	return "egress"
}

// pin is where a tcx attachment's link is pinned in the pod's directory.
func (a TCAttachment) pin(podDir string) string {
	return filepath.Join(podDir, fmt.Sprintf("tcx_%s_%d", a.Prog, a.Ifindex))
}

// Legacy filters take this priority and handle; one of ours per interface and
// direction. A distinctive value keeps clear of filters other tools add.
const (
	legacyPriority = 0xe8d
	legacyHandle   = 0xe8d
)

func (a TCAttachment) filter(prog *ebpf.Program) *netlink.BpfFilter {
	parent := uint32(netlink.HANDLE_MIN_EGRESS)
	if a.Ingress {
		parent = netlink.HANDLE_MIN_INGRESS
	}
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: a.Ifindex,
			Parent:    parent,
			Handle:    a.Handle,
			Priority:  a.Priority,
			Protocol:  unix.ETH_P_ALL,
		},
		Name:         "ebpf-redirect-" + a.dir(),
		DirectAction: true,
		Fd:           -1,
	}
	if prog != nil {
		f.Fd = prog.FD()
	}
	return f
}

// attachTC attaches prog on one interface of the pod. With TCAuto it tries
// tcx and falls back to legacy only when the kernel lacks tcx.
func attachTC(ns netns.NsHandle, mode TCMode, a TCAttachment, prog *ebpf.Program, podDir string) (TCAttachment, error) {
	if mode == TCAuto || mode == TCX {
		a.Mode = TCX
		attach := ebpf.AttachTCXEgress
		if a.Ingress {
			attach = ebpf.AttachTCXIngress
		}
		var l link.Link
		// AttachTCX resolves the ifindex in the calling thread's netns.
		err := podnet.Do(ns, func() error {
			var aerr error
			l, aerr = link.AttachTCX(link.TCXOptions{Interface: a.Ifindex, Program: prog, Attach: attach})
			return aerr
		})
		if err == nil {
			return a, pinLink(l, a.pin(podDir))
		}
		if mode == TCX || !errors.Is(err, ebpf.ErrNotSupported) {
			return a, fmt.Errorf("attaching tcx %s on %s: %w", a.dir(), a.Iface, err)
		}
	}
	a.Mode, a.Priority, a.Handle = TCLegacy, legacyPriority, legacyHandle
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return a, err
	}
	defer h.Close()
	q := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: a.Ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := h.QdiscAdd(q); err == nil {
		a.QdiscCreated = true
	} else if !errors.Is(err, unix.EEXIST) {
		return a, fmt.Errorf("adding clsact qdisc on %s: %w", a.Iface, err)
	}
	if err := h.FilterAdd(a.filter(prog)); err != nil {
		if a.QdiscCreated {
			_ = h.QdiscDel(q)
		}
		return a, fmt.Errorf("adding cls_bpf %s filter on %s: %w", a.dir(), a.Iface, err)
	}
	return a, nil
}

// detachTC undoes attachTC. A missing attachment (interface or netns gone) is
// not an error.
func detachTC(ns netns.NsHandle, a TCAttachment, podDir string) error {
	if a.Mode == TCX {
		return unpinLink(a.pin(podDir))
	}
	if ns < 0 {
		return nil // the netns is gone, and its filters with it
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	if err := h.FilterDel(a.filter(nil)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("removing cls_bpf %s filter on %s: %w", a.dir(), a.Iface, err)
	}
	if a.QdiscCreated {
		q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: a.Ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
		if err := h.QdiscDel(q); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("removing clsact qdisc on %s: %w", a.Iface, err)
		}
	}
	return nil
}

// replaceTC swaps the program of an attachment atomically (upgrade).
func replaceTC(ns netns.NsHandle, a TCAttachment, prog *ebpf.Program, podDir string) error {
	if a.Mode == TCX {
		return updateLink(a.pin(podDir), prog)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	return h.FilterReplace(a.filter(prog))
}

// legacyProgID is the id of the program our legacy filter runs.
func legacyProgID(h *netlink.Handle, a TCAttachment) (ebpf.ProgramID, error) {
	f, err := legacyFilter(h, a)
	if err != nil {
		return 0, err
	}
	return ebpf.ProgramID(f.Id), nil
}

// legacyFilter finds our cls_bpf filter of an attachment.
func legacyFilter(h *netlink.Handle, a TCAttachment) (*netlink.BpfFilter, error) {
	lk, err := h.LinkByIndex(a.Ifindex)
	if err != nil {
		return nil, fmt.Errorf("interface %s: %w", a.Iface, err)
	}
	fs, err := h.FilterList(lk, a.filter(nil).Parent)
	if err != nil {
		return nil, err
	}
	for _, f := range fs {
		if bf, ok := f.(*netlink.BpfFilter); ok && bf.Priority == a.Priority && bf.Handle == a.Handle {
			return bf, nil
		}
	}
	return nil, fmt.Errorf("cls_bpf %s filter on %s: missing", a.dir(), a.Iface)
}

// tcPresent reports whether the attachment is still in place.
func tcPresent(ns netns.NsHandle, a TCAttachment, podDir string) error {
	if a.Mode == TCX {
		l, err := link.LoadPinnedLink(a.pin(podDir), nil)
		if err != nil {
			return fmt.Errorf("tcx %s link on %s: %w", a.dir(), a.Iface, err)
		}
		defer l.Close()
		info, err := l.Info()
		if err != nil {
			return err
		}
		if tcx := info.TCX(); tcx == nil || int(tcx.Ifindex) != a.Ifindex {
			return fmt.Errorf("tcx %s link on %s: detached (interface gone)", a.dir(), a.Iface)
		}
		return nil
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	_, err = legacyFilter(h, a)
	return err
}

// openLink opens a pinned link; nil (and no error) if there is no such pin.
func openLink(path string) (link.Link, error) {
	l, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	return l, nil
}

// unpinLink unpins one link (which detaches it if nothing else holds it).
func unpinLink(path string) error {
	l, err := openLink(path)
	if l == nil {
		return err
	}
	defer l.Close()
	return l.Unpin()
}

func updateLink(path string, prog *ebpf.Program) error {
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return fmt.Errorf("opening %s: %w", path, err)
	}
	defer l.Close()
	if err := l.Update(prog); err != nil {
		return fmt.Errorf("updating %s: %w", path, err)
	}
	return nil
}
