package test

// Playing well with others (issue 3): the legacy tc attachment is equivalent
// too, our tc programs hand packets on to other tc programs (tcx and cls_bpf),
// and our cgroup programs run alongside another tool's without undoing it or
// being undone.

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/equiv"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// TestEquivalenceLegacyTC runs the inbound cases (the ones that go through tc)
// and a few outbound ones with --tc-mode legacy: clsact + cls_bpf, as on a
// kernel without tcx.
func TestEquivalenceLegacyTC(t *testing.T) {
	r := runner(t)
	ref := referenceBackend(t)
	cand := &equiv.Ebpf{Binary: ebpfBinary(t), ExtraArgs: []string{"--tc-mode", "legacy"}}
	n := 0
	for _, c := range equiv.Cases() {
		if !strings.HasPrefix(c.Name, "in-") && c.Name != "out-peer-http" && c.Name != "out-self-call-15006" {
			continue
		}
		n++
		t.Run(c.Name, func(t *testing.T) {
			skipUnavailable(t, c)
			o, err := r.RunPair(context.Background(), c, ref, cand)
			if err != nil {
				t.Fatal(err)
			}
			if perr := o.Problem(); perr != nil {
				t.Errorf("%s\nunder legacy tc: %v", c.Description, perr)
			}
		})
	}
	if n < 10 {
		t.Fatalf("only %d cases selected", n)
	}
}

// counterProg is another tool's program: it counts what it sees and lets it
// go on (tc: "next"; cgroup: allow). With synOnly (tc) it counts only TCP SYNs
// (no IP options), so that it proves it saw the packets ebpf-redirect acted on.
func counterProg(t *testing.T, typ ebpf.ProgramType, attach ebpf.AttachType, verdict int32, synOnly bool) (*ebpf.Program, *ebpf.Map) {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	var filter asm.Instructions
	if synOnly {
		filter = asm.Instructions{
			asm.LoadMem(asm.R2, asm.R1, 76, asm.Word), // skb->data
			asm.LoadMem(asm.R3, asm.R1, 80, asm.Word), // skb->data_end
			asm.Mov.Reg(asm.R4, asm.R2),
			asm.Add.Imm(asm.R4, 48),
			asm.JGT.Reg(asm.R4, asm.R3, "out"),
			asm.LoadMem(asm.R5, asm.R2, 12, asm.Half), // ethertype
			asm.JNE.Imm(asm.R5, 0x0008, "out"),        // ETH_P_IP, network order
			asm.LoadMem(asm.R5, asm.R2, 23, asm.Byte), // IP protocol
			asm.JNE.Imm(asm.R5, 6, "out"),
			asm.LoadMem(asm.R5, asm.R2, 47, asm.Byte), // TCP flags
			asm.And.Imm(asm.R5, 0x12),
			asm.JNE.Imm(asm.R5, 0x02, "out"), // SYN without ACK
		}
	}
	insns := append(filter,
		asm.StoreImm(asm.RFP, -4, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, m.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "out"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.Mov.Imm(asm.R0, verdict).WithSymbol("out"),
		asm.Return(),
	)
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: typ, AttachType: attach, License: "GPL", Instructions: insns})
	if err != nil {
		m.Close()
		t.Fatal(err)
	}
	return p, m
}

func count(t *testing.T, m *ebpf.Map) uint64 {
	var v uint64
	if err := m.Lookup(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// neighbours installs another tool's cls_bpf filter on the pod's interface and
// a connect4 program on its cgroup before ebpf-redirect attaches, and a tcx
// program after it (so it runs after ours); after detach it checks they all
// ran and are still attached.
type neighbours struct {
	t     *testing.T
	inner *equiv.Ebpf
	mu    sync.Mutex

	tcxMap, clsMap, cgMap *ebpf.Map
	closers               []func()
	legacy                *netlink.BpfFilter
	ns                    netns.NsHandle
	checked               bool
	outbound              bool // the case connects from the pod: connect4 must run
}

func (n *neighbours) Name() string { return "ebpf+neighbours" }

func (n *neighbours) Apply(ctx context.Context, run *topology.Run, pod *topology.Pod) error {
	t := n.t
	ns, err := podnet.Open(pod.NetNSPath())
	if err != nil {
		return err
	}
	n.ns = ns
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	eth, err := h.LinkByName(topology.PodIfName)
	if err != nil {
		return err
	}
	idx := eth.Attrs().Index

	clsProg, clsMap := counterProg(t, ebpf.SchedCLS, ebpf.AttachNone, -1, true) // TC_ACT_UNSPEC: next filter
	n.clsMap = clsMap
	q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: idx, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
	if err := h.QdiscAdd(q); err != nil {
		return fmt.Errorf("clsact: %w", err)
	}
	n.legacy = &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: idx, Parent: netlink.HANDLE_MIN_INGRESS, Handle: 1, Priority: 7, Protocol: unix.ETH_P_ALL},
		Fd: clsProg.FD(), Name: "other-tool", DirectAction: true}
	if err := h.FilterAdd(n.legacy); err != nil {
		return fmt.Errorf("other tool's cls_bpf: %w", err)
	}
	n.closers = append(n.closers, func() { clsProg.Close(); clsMap.Close() })

	cgProg, cgMap := counterProg(t, ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect, 1, false)
	n.cgMap = cgMap
	cl, err := link.AttachCgroup(link.CgroupOptions{Path: pod.PodCgroup, Attach: ebpf.AttachCGroupInet4Connect, Program: cgProg})
	if err != nil {
		return fmt.Errorf("other tool's connect4: %w", err)
	}
	n.closers = append(n.closers, func() { cl.Close(); cgProg.Close(); cgMap.Close() })

	if err := n.inner.Apply(ctx, run, pod); err != nil {
		return err
	}
	// After ours, so it runs only if ours hands the packet on.
	tcxProg, tcxMap := counterProg(t, ebpf.SchedCLS, ebpf.AttachNone, -1, true) // TCX_NEXT
	n.tcxMap = tcxMap
	var l link.Link
	if err := podnet.Do(ns, func() error {
		var aerr error
		l, aerr = link.AttachTCX(link.TCXOptions{Interface: idx, Program: tcxProg, Attach: ebpf.AttachTCXIngress})
		return aerr
	}); err != nil {
		return fmt.Errorf("other tool's tcx: %w", err)
	}
	n.closers = append(n.closers, func() { l.Close(); tcxProg.Close(); tcxMap.Close() })

	return nil
}

func (n *neighbours) Remove(ctx context.Context, run *topology.Run, pod *topology.Pod) error {
	err := n.inner.Remove(ctx, run, pod)
	t := n.t
	n.mu.Lock()
	defer n.mu.Unlock()
	n.checked = true
	// Inbound cases: the SYN ebpf-redirect rewrote must reach both.
	if c := count(t, n.tcxMap); c == 0 && !n.outbound {
		t.Errorf("the other tool's tcx program never saw a SYN after ours")
	}
	if c := count(t, n.clsMap); c == 0 && !n.outbound {
		t.Errorf("the other tool's cls_bpf filter never saw a SYN after ours")
	}
	if c := count(t, n.cgMap); c == 0 && n.outbound {
		t.Errorf("the other tool's connect4 program never ran")
	}
	// Our detach left theirs in place.
	h, herr := netlink.NewHandleAt(n.ns)
	if herr == nil {
		eth, _ := h.LinkByName(topology.PodIfName)
		fs, _ := h.FilterList(eth, netlink.HANDLE_MIN_INGRESS)
		found := false
		for _, f := range fs {
			found = found || f.Attrs().Priority == 7
		}
		if !found {
			t.Errorf("detaching ebpf-redirect removed the other tool's cls_bpf filter")
		}
		h.Close()
	}
	for i := len(n.closers) - 1; i >= 0; i-- {
		n.closers[i]()
	}
	n.ns.Close()
	return err
}

func TestCoexistsWithOtherPrograms(t *testing.T) {
	r := runner(t)
	ref := referenceBackend(t)
	for _, name := range []string{"in-app-port", "out-peer-http"} {
		t.Run(name, func(t *testing.T) {
			c, ok := equiv.CaseByName(name)
			if !ok {
				t.Fatalf("no case %s", name)
			}
			nb := &neighbours{t: t, inner: &equiv.Ebpf{Binary: ebpfBinary(t)}, outbound: strings.HasPrefix(name, "out-")}
			o, err := r.RunPair(context.Background(), c, ref, nb)
			if err != nil {
				t.Fatal(err)
			}
			if o.Diff != "" {
				t.Errorf("with other programs present, records differ:\n%s", o.Diff)
			}
			if !nb.checked {
				t.Fatal("the backend was never removed")
			}
		})
	}
}
