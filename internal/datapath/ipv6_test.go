package datapath

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
)

// The IPv6 branches of the tc programs, through BPF_PROG_TEST_RUN: the
// exemptions of inpod-rules.v6, the redirect to the interface's address of the
// destination's scope (checksum and extension headers included), what follows
// a SYN, the way back, and failing closed.

func TestIngress6LeavesAlone(t *testing.T) {
	f := newFixture(t)
	for _, tc := range []struct {
		name string
		pkt  tcpPacket
		mark uint32
		rule Rule
	}{
		{"from the IPv6 probe address", tcpPacket{src: probeIP6, dst: podIP6, sport: 40000, dport: 8080, syn: true}, 0, RuleInProbe},
		{"to ::1", tcpPacket{src: remoteIP6, dst: localhost6, sport: 40001, dport: 8080, syn: true}, 0, RuleInUntouched},
		{"to the hbone port", tcpPacket{src: remoteIP6, dst: podIP6, sport: 40002, dport: 15008, syn: true}, 0, RuleInUntouched},
		{"proxy mark", tcpPacket{src: remoteIP6, dst: podIP6, sport: 40003, dport: 8080, syn: true}, 0x539, RuleInUntouched},
		{"the IPv4 probe address is not IPv6's", tcpPacket{src: remoteIP6, dst: podIP6, sport: 40004, dport: 15008, syn: true, ext: []uint8{unix.IPPROTO_DSTOPTS}}, 0, RuleInUntouched},
		{"syn-ack is not a new connection", tcpPacket{src: remoteIP6, dst: podIP6, sport: 80, dport: 40005, syn: true, ack: true}, 0, 0},
		{"ack of an unknown flow", tcpPacket{src: remoteIP6, dst: podIP6, sport: 40006, dport: 8080, ack: true}, 0, 0},
		{"udp", tcpPacket{src: remoteIP6, dst: podIP6, sport: 40007, dport: 8080, proto: unix.IPPROTO_UDP}, 0, 0},
		{"icmpv6", tcpPacket{src: remoteIP6, dst: podIP6, proto: unix.IPPROTO_ICMPV6}, 0, 0},
		{"no next header", tcpPacket{src: remoteIP6, dst: podIP6, proto: unix.IPPROTO_NONE}, 0, 0},
		{"a fragment of udp", tcpPacket{src: remoteIP6, dst: podIP6, proto: unix.IPPROTO_UDP, ext: []uint8{unix.IPPROTO_FRAGMENT}, fragOff: 1}, 0, 0},
		{"esp (its ports cannot be seen, nor by netfilter)", tcpPacket{src: remoteIP6, dst: podIP6, proto: unix.IPPROTO_ESP}, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var before uint64
			if tc.rule != 0 {
				before = f.counter(t, tc.rule)
			}
			in := tc.pkt.bytes()
			ret, out := f.run(t, f.dp.PodIngress, in, tc.mark)
			if ret != tcxNext {
				t.Fatalf("verdict %d, want next (%d)", ret, tcxNext)
			}
			if string(out) != string(in) {
				t.Fatalf("packet changed")
			}
			if tc.rule != 0 && f.counter(t, tc.rule) != before+1 {
				t.Fatalf("rule %v not counted", tc.rule)
			}
		})
	}
}

func TestIngress6RedirectsNewConnections(t *testing.T) {
	f := newFixture(t)
	for _, tc := range []struct {
		name string
		pkt  tcpPacket
		to   string // the address REDIRECT picks
	}{
		{"to the pod address", tcpPacket{src: remoteIP6, dst: podIP6, sport: 41000, dport: 8080, syn: true}, podIP6.String()},
		{"to a secondary address: REDIRECT uses the first global one", tcpPacket{src: remoteIP6, dst: secondIP6, sport: 41001, dport: 8080, syn: true}, podIP6.String()},
		{"to the link-local address: REDIRECT uses the link-local one", tcpPacket{src: remoteLL6, dst: podLL6, sport: 41002, dport: 8080, syn: true}, podLL6.String()},
		{"after hop-by-hop, routing and destination options", tcpPacket{src: remoteIP6, dst: podIP6, sport: 41003, dport: 9090, syn: true,
			ext: []uint8{unix.IPPROTO_HOPOPTS, unix.IPPROTO_ROUTING, unix.IPPROTO_DSTOPTS}}, podIP6.String()},
		{"after an authentication header", tcpPacket{src: remoteIP6, dst: podIP6, sport: 41004, dport: 9090, syn: true, ext: []uint8{unix.IPPROTO_AH}}, podIP6.String()},
		{"to the outbound port", tcpPacket{src: remoteIP6, dst: podIP6, sport: 41005, dport: 15001, syn: true}, podIP6.String()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := f.counter(t, RuleInRedirect)
			ret, out := f.run(t, f.dp.PodIngress, tc.pkt.bytes(), 0)
			if ret != tcxNext {
				t.Fatalf("verdict %d, want next", ret)
			}
			p := parse(t, out)
			if p.dst.String() != tc.to || p.dport != 15006 || p.src != tc.pkt.src || p.sport != tc.pkt.sport || !p.tcpOK {
				t.Fatalf("got %v:%d -> %v:%d (checksum ok %v), want -> %s:15006", p.src, p.sport, p.dst, p.dport, p.tcpOK, tc.to)
			}
			var fl InFlow
			if err := f.dp.InFlows.Lookup(FlowKey{Netns: f.cookie, Addr: Addr(tc.pkt.src), Port: tc.pkt.sport}, &fl); err != nil {
				t.Fatalf("no flow entry: %v", err)
			}
			if AddrOf(fl.Orig) != tc.pkt.dst || fl.OrigPort != tc.pkt.dport || AddrOf(fl.New).String() != tc.to {
				t.Fatalf("flow entry %+v", fl)
			}
			if f.counter(t, RuleInRedirect) != before+1 {
				t.Fatal("redirect not counted")
			}
			counts, err := f.dp.Counts(f.cookie)
			if err != nil || counts[Count{RuleInRedirect, FamilyV6}] == 0 {
				t.Fatalf("not counted as IPv6: %v %v", counts, err)
			}

			later := tc.pkt
			later.syn, later.ack = false, true
			ret, out = f.run(t, f.dp.PodIngress, later.bytes(), 0)
			p = parse(t, out)
			if ret != tcxNext || p.dst.String() != tc.to || p.dport != 15006 || !p.tcpOK {
				t.Fatalf("later packet: verdict %d, %v:%d, checksum %v", ret, p.dst, p.dport, p.tcpOK)
			}

			reply := tcpPacket{src: AddrOf(fl.New), dst: tc.pkt.src, sport: 15006, dport: tc.pkt.sport, syn: true, ack: true}
			ret, out = f.run(t, f.dp.PodEgress, reply.bytes(), 0)
			p = parse(t, out)
			if ret != tcxNext || p.src != tc.pkt.dst || p.sport != tc.pkt.dport || !p.tcpOK {
				t.Fatalf("reply: verdict %d, from %v:%d, checksum %v; want from %v:%d", ret, p.src, p.sport, p.tcpOK, tc.pkt.dst, tc.pkt.dport)
			}
		})
	}
}

func TestIngress6FailsClosed(t *testing.T) {
	f := newFixture(t)
	nine := make([]uint8, 9)
	for i := range nine {
		nine[i] = unix.IPPROTO_DSTOPTS
	}
	for _, tc := range []struct {
		name  string
		pkt   tcpPacket
		setup func(t *testing.T)
	}{
		{"first tcp fragment", tcpPacket{src: remoteIP6, dst: podIP6, sport: 43000, dport: 8080, syn: true, ext: []uint8{unix.IPPROTO_FRAGMENT}, fragOff: 1}, nil},
		{"later tcp fragment", tcpPacket{src: remoteIP6, dst: podIP6, sport: 43001, dport: 8080, ext: []uint8{unix.IPPROTO_FRAGMENT}, fragOff: 0x0010}, nil},
		{"a fragment after options", tcpPacket{src: remoteIP6, dst: podIP6, sport: 43002, dport: 8080, syn: true, ext: []uint8{unix.IPPROTO_HOPOPTS, unix.IPPROTO_FRAGMENT}}, nil},
		{"truncated tcp header", tcpPacket{src: remoteIP6, dst: podIP6, sport: 43003, dport: 8080, syn: true, truncateTCPAfter: 12}, nil},
		{"payload length beyond the frame", tcpPacket{src: remoteIP6, dst: podIP6, sport: 43004, dport: 8080, syn: true, totLenDelta: 40}, nil},
		{"payload length short of the headers", tcpPacket{src: remoteIP6, dst: podIP6, sport: 43005, dport: 8080, syn: true, totLenDelta: -15}, nil},
		{"tcp behind more extension headers than any packet has", tcpPacket{src: remoteIP6, dst: podIP6, sport: 43006, dport: 8080, syn: true, ext: nine}, nil},
		{"no IPv6 address on the interface", tcpPacket{src: remoteIP6, dst: podIP6, sport: 43007, dport: 8080, syn: true}, func(t *testing.T) {
			if err := f.dp.Ifaces.Put(IfaceKey{Netns: f.cookie, Ifindex: 1}, IfaceInfo{Primary4: be32(podIP)}); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.setup != nil {
				tc.setup(t)
			}
			ret, _ := f.run(t, f.dp.PodIngress, tc.pkt.bytes(), 0)
			if ret != tcxDrop {
				t.Fatalf("verdict %d, want drop", ret)
			}
			var fl InFlow
			if err := f.dp.InFlows.Lookup(FlowKey{Netns: f.cookie, Addr: Addr(tc.pkt.src), Port: tc.pkt.sport}, &fl); !errors.Is(err, ebpf.ErrKeyNotExist) {
				t.Fatalf("a dropped packet recorded a flow: %+v %v", fl, err)
			}
		})
	}
}

// With IPv6 capture off (as with no ip6tables rules) IPv6 passes untouched.
func TestIPv6OffLeavesIPv6Alone(t *testing.T) {
	f := newSizedFixture(t, func(c *config.Config) { c.IPv6 = false })
	syn := tcpPacket{src: remoteIP6, dst: podIP6, sport: 44000, dport: 8080, syn: true}
	in := syn.bytes()
	ret, out := f.run(t, f.dp.PodIngress, in, 0)
	if ret != tcxNext || string(out) != string(in) {
		t.Fatalf("verdict %d, changed %v", ret, string(out) != string(in))
	}
	frag := tcpPacket{src: remoteIP6, dst: podIP6, sport: 44001, dport: 8080, syn: true, ext: []uint8{unix.IPPROTO_FRAGMENT}, fragOff: 1}
	if ret, _ := f.run(t, f.dp.PodIngress, frag.bytes(), 0); ret != tcxNext {
		t.Fatalf("a TCP fragment: verdict %d with IPv6 capture off", ret)
	}
	v4 := tcpPacket{src: remoteIP, dst: podIP, sport: 44002, dport: 8080, syn: true}
	ret, out = f.run(t, f.dp.PodIngress, v4.bytes(), 0)
	if p := parse(t, out); ret != tcxNext || p.dport != 15006 {
		t.Fatalf("IPv4 is still redirected: verdict %d, port %d", ret, p.dport)
	}
}

// The pod sockets' ingress guard and marks, for IPv6: a new connection on an
// interface without the tc programs is refused; every SYN but one carrying
// the connection mark (the proxy's, from lo) loses its mark.
func TestSockIngress6(t *testing.T) {
	f := newFixture(t)
	other := hostIface(t)
	syn := tcpPacket{src: remoteIP6, dst: podIP6, sport: 47000, dport: 8080, syn: true}
	// cgroup_skb sees the packet from its network header.
	ret, _ := runCtx(t, f.dp.PodSockIngress, syn.bytes(), sockIngressCtx(other))
	if ret != 0 {
		t.Fatalf("an IPv6 SYN on an interface without state: verdict %d, want drop", ret)
	}
	for _, tc := range []struct {
		mark, want uint32
	}{{0x111, 0x111}, {0x53a, 0}, {0x539, 0}, {0x1111, 0}} {
		ctx := sockIngressCtx(1)
		putMark(ctx, tc.mark)
		ret, out := runCtxOut(t, f.dp.PodSockIngress, syn.bytes(), ctx)
		if ret != 1 || markOf(out) != tc.want {
			t.Errorf("SYN marked %#x on lo: verdict %d, mark %#x, want %#x", tc.mark, ret, markOf(out), tc.want)
		}
	}
}

// runCtxOut runs a program on a packet and returns the __sk_buff it leaves.
func runCtxOut(t testing.TB, prog *ebpf.Program, pkt, ctx []byte) (int32, []byte) {
	t.Helper()
	out := make([]byte, len(ctx))
	opts := &ebpf.RunOptions{Data: pkt, DataOut: make([]byte, len(pkt)+256), Context: ctx, ContextOut: out}
	ret, err := prog.Run(opts)
	if err != nil {
		t.Fatalf("test run: %v", err)
	}
	return int32(ret), out
}

// The mark of a struct __sk_buff.
func putMark(ctx []byte, m uint32) { binary.NativeEndian.PutUint32(ctx[8:], m) }
func markOf(ctx []byte) uint32     { return binary.NativeEndian.Uint32(ctx[8:]) }

// lo's ingress gives what carries the proxy's mark the connection mark
// instead, and counts the proxy's new connections, of both families.
func TestLoIngressGivesTheConnectionMark(t *testing.T) {
	f := newFixture(t)
	for _, tc := range []struct {
		name       string
		pkt        tcpPacket
		mark, want uint32
		counted    bool
	}{
		{"the proxy's SYN", tcpPacket{src: podIP, dst: podIP, sport: 48000, dport: 8080, syn: true}, 0x539, 0x111, true},
		{"the proxy's IPv6 SYN", tcpPacket{src: remoteIP6, dst: podIP6, sport: 48001, dport: 8080, syn: true}, 0x539, 0x111, true},
		{"the proxy's later packet", tcpPacket{src: podIP, dst: podIP, sport: 48002, dport: 8080, ack: true}, 0x1539, 0x111, false},
		{"the proxy's UDP", tcpPacket{src: podIP, dst: podIP, sport: 48003, dport: 53, proto: unix.IPPROTO_UDP}, 0x539, 0x111, false},
		{"the application's SYN", tcpPacket{src: podIP, dst: podIP, sport: 48004, dport: 8080, syn: true}, 0x53a, 0x53a, false},
		{"unmarked", tcpPacket{src: podIP, dst: podIP, sport: 48005, dport: 8080, syn: true}, 0, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := f.counter(t, RuleConnMarkRestore)
			ret, out := runCtxOut(t, f.dp.PodLoIngress, tc.pkt.bytes(), skbCtx(tc.mark))
			if ret != tcxNext || markOf(out) != tc.want {
				t.Fatalf("verdict %d, mark %#x, want %#x", ret, markOf(out), tc.want)
			}
			if counted := f.counter(t, RuleConnMarkRestore) != before; counted != tc.counted {
				t.Fatalf("counted %v, want %v", counted, tc.counted)
			}
		})
	}
}

// A segment to ::1 leaving through the pod's interface (the kernel's own
// reset or TIME_WAIT ACK to a redirected peer, routed by the interface the
// proxy's segment came in on) is sent to lo instead, its MAC cleared.
func TestEgress6SendsLoopbackToLo(t *testing.T) {
	f := newFixture(t)
	rst := tcpPacket{src: podIP6, dst: localhost6, sport: 49000, dport: 15001, rst: true, payload: []byte{}}
	ret, out := f.run(t, f.dp.PodEgress, rst.bytes(), 0)
	if ret != tcxRedirect {
		t.Fatalf("verdict %d, want a redirect to lo", ret)
	}
	for i, b := range out[:6] {
		if b != 0 {
			t.Fatalf("destination MAC byte %d is %#x, want 0 (lo's)", i, b)
		}
	}
	for _, p := range []tcpPacket{
		{src: podIP6, dst: localhost6, sport: 49003, dport: 15001, syn: true}, // a socket bound to the interface: as ip6tables, its SYN leaves
		{src: podIP6, dst: remoteIP6, sport: 49001, dport: 80, rst: true},
		{src: podIP, dst: localhost, sport: 49002, dport: 15001, rst: true},
	} {
		in := p.bytes()
		if ret, out := f.run(t, f.dp.PodEgress, in, 0); ret != tcxNext || string(out) != string(in) {
			t.Errorf("%v -> %v: verdict %d, changed %v", p.src, p.dst, ret, string(out) != string(in))
		}
	}
}
