package datapath

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/privtest"
)

// Verdicts of a tcx program.
const (
	tcxNext = -1
	tcxDrop = 2
)

var (
	podIP     = netip.MustParseAddr("10.9.0.2")
	secondIP  = netip.MustParseAddr("10.9.0.3")
	remoteIP  = netip.MustParseAddr("10.9.0.1")
	probeIP   = netip.MustParseAddr("169.254.7.127")
	localhost = netip.MustParseAddr("127.0.0.1")

	podIP6     = netip.MustParseAddr("fd00:9::2")
	secondIP6  = netip.MustParseAddr("fd00:9::3")
	podLL6     = netip.MustParseAddr("fe80::2")
	remoteIP6  = netip.MustParseAddr("fd00:9::1")
	remoteLL6  = netip.MustParseAddr("fe80::1")
	probeIP6   = netip.MustParseAddr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
	localhost6 = netip.MustParseAddr("::1")
)

func requireBPF(t testing.TB) {
	t.Helper()
	privtest.Require(t)
}

func be32(a netip.Addr) uint32 { b := a.As4(); return binary.NativeEndian.Uint32(b[:]) }

// hostCookie is the cookie of the test's own network namespace, which is
// where BPF_PROG_TEST_RUN puts its packets (on lo, ifindex 1).
func hostCookie(t testing.TB) uint64 {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		t.Fatalf("SO_NETNS_COOKIE: %v", err)
	}
	return v
}

type fixture struct {
	dp     *Datapath
	cookie uint64
}

func newFixture(t *testing.T) *fixture { return newSizedFixture(t, nil) }

// tcpPacket builds an Ethernet/IPv4/TCP frame with valid checksums.
type tcpPacket struct {
	src, dst         netip.Addr
	sport, dport     uint16
	syn, ack, fin    bool
	ipOptions        []byte
	fragOff          uint16 // raw frag_off field (flags + offset)
	proto            uint8  // 0: TCP
	truncateTCPAfter int    // if > 0, cut the TCP header to this many bytes
	rst              bool
	seq, ackSeq      uint32 // 0: 1000 and 0
	payload          []byte // nil: "hello"
	totLenDelta      int    // added to the IP total length after it is computed
	trailer          []byte // bytes after the IP packet (link-layer padding)
	// IPv6 (src and dst are IPv6): extension headers before the TCP header,
	// by type (HOPOPTS, ROUTING, DSTOPTS: 8 bytes; AH: 24; FRAGMENT: 8, with
	// fragOff as its offset and M flag).
	ext []uint8
}

func (p tcpPacket) v6() bool { return p.src.Is6() && !p.src.Is4In6() }

// tcpHeader is the TCP header and payload of the packet.
func (p tcpPacket) l4() []byte {
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], p.sport)
	binary.BigEndian.PutUint16(tcp[2:], p.dport)
	seq := p.seq
	if seq == 0 {
		seq = 1000
	}
	binary.BigEndian.PutUint32(tcp[4:], seq)
	binary.BigEndian.PutUint32(tcp[8:], p.ackSeq)
	tcp[12] = 5 << 4
	var flags byte
	if p.fin {
		flags |= 0x01
	}
	if p.syn {
		flags |= 0x02
	}
	if p.rst {
		flags |= 0x04
	}
	if p.ack {
		flags |= 0x10
	}
	tcp[13] = flags
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	payload := []byte("hello")
	if p.payload != nil {
		payload = p.payload
	}
	return append(tcp, payload...)
}

func ethHeader(proto uint16) []byte {
	eth := make([]byte, 14)
	copy(eth[0:6], []byte{2, 0, 0, 0, 0, 1})
	copy(eth[6:12], []byte{2, 0, 0, 0, 0, 2})
	binary.BigEndian.PutUint16(eth[12:], proto)
	return eth
}

// bytes6 builds an Ethernet/IPv6/TCP frame with a valid checksum.
func (p tcpPacket) bytes6() []byte {
	proto := p.proto
	if proto == 0 {
		proto = unix.IPPROTO_TCP
	}
	l4 := p.l4()
	if proto == unix.IPPROTO_TCP && p.truncateTCPAfter == 0 {
		binary.BigEndian.PutUint16(l4[16:], tcpCsum6(p.src, p.dst, l4))
	}
	if p.truncateTCPAfter > 0 {
		l4 = l4[:p.truncateTCPAfter]
	}
	// Extension headers, chained to the upper protocol.
	var ext []byte
	for i, typ := range p.ext {
		next := proto
		if i+1 < len(p.ext) {
			next = p.ext[i+1]
		}
		var h []byte
		switch typ {
		case unix.IPPROTO_AH:
			h = make([]byte, 24)
			h[1] = 4 // (4+2)*4 = 24 bytes
		case unix.IPPROTO_FRAGMENT:
			h = make([]byte, 8)
			binary.BigEndian.PutUint16(h[2:], p.fragOff)
		default:
			h = make([]byte, 8) // hdrlen 0: 8 bytes
		}
		h[0] = next
		ext = append(ext, h...)
	}
	first := proto
	if len(p.ext) > 0 {
		first = p.ext[0]
	}
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(l4)+p.totLenDelta))
	ip[6] = first
	ip[7] = 64
	s, d := p.src.As16(), p.dst.As16()
	copy(ip[8:24], s[:])
	copy(ip[24:40], d[:])
	return append(append(append(append(ethHeader(0x86dd), ip...), ext...), l4...), p.trailer...)
}

func tcpCsum6(src, dst netip.Addr, l4 []byte) uint16 {
	ph := make([]byte, 40)
	s, d := src.As16(), dst.As16()
	copy(ph[0:16], s[:])
	copy(ph[16:32], d[:])
	binary.BigEndian.PutUint32(ph[32:], uint32(len(l4)))
	ph[39] = unix.IPPROTO_TCP
	c := append(ph, l4...)
	cp := make([]byte, len(c))
	copy(cp, c)
	cp[40+16], cp[40+17] = 0, 0
	return csum(cp)
}

func (p tcpPacket) bytes() []byte {
	if p.v6() {
		return p.bytes6()
	}
	eth := ethHeader(0x0800)
	ihl := 5 + len(p.ipOptions)/4
	proto := p.proto
	if proto == 0 {
		proto = unix.IPPROTO_TCP
	}
	l4 := p.l4()
	if p.truncateTCPAfter > 0 {
		l4 = l4[:p.truncateTCPAfter]
	}
	ip := make([]byte, ihl*4)
	ip[0] = 0x40 | byte(ihl)
	binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)+len(l4)+p.totLenDelta))
	binary.BigEndian.PutUint16(ip[6:], p.fragOff)
	ip[8] = 64
	ip[9] = proto
	s, d := p.src.As4(), p.dst.As4()
	copy(ip[12:16], s[:])
	copy(ip[16:20], d[:])
	copy(ip[20:], p.ipOptions)
	binary.BigEndian.PutUint16(ip[10:], csum(ip))
	if proto == unix.IPPROTO_TCP && p.truncateTCPAfter == 0 {
		binary.BigEndian.PutUint16(l4[16:], tcpCsum(ip, l4))
	}
	return append(append(append(eth, ip...), l4...), p.trailer...)
}

func csum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

func tcpCsum(ip, l4 []byte) uint16 {
	ph := make([]byte, 12)
	copy(ph[0:8], ip[12:20])
	ph[9] = unix.IPPROTO_TCP
	binary.BigEndian.PutUint16(ph[10:], uint16(len(l4)))
	c := append(ph, l4...)
	// the checksum field itself must count as zero
	cp := make([]byte, len(c))
	copy(cp, c)
	cp[12+16], cp[12+17] = 0, 0
	return csum(cp)
}

// parsed is what a test reads back from a packet.
type parsed struct {
	src, dst     netip.Addr
	sport, dport uint16
	ipOK, tcpOK  bool
}

func parse(t *testing.T, b []byte) parsed {
	t.Helper()
	if binary.BigEndian.Uint16(b[12:]) == 0x86dd {
		return parse6(t, b)
	}
	ip := b[14:]
	ihl := int(ip[0]&0xf) * 4
	tot := int(binary.BigEndian.Uint16(ip[2:]))
	l4 := ip[ihl:tot]
	var p parsed
	p.src = netip.AddrFrom4([4]byte(ip[12:16]))
	p.dst = netip.AddrFrom4([4]byte(ip[16:20]))
	p.sport = binary.BigEndian.Uint16(l4[0:])
	p.dport = binary.BigEndian.Uint16(l4[2:])
	p.ipOK = csum(ip[:ihl]) == 0
	p.tcpOK = binary.BigEndian.Uint16(l4[16:]) == tcpCsum(ip[:ihl], l4)
	return p
}

// parse6 reads an IPv6 frame, skipping the extension headers bytes6 makes.
func parse6(t *testing.T, b []byte) parsed {
	t.Helper()
	ip := b[14:]
	var p parsed
	p.src, p.dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
	next, off := ip[6], 40
	for next != unix.IPPROTO_TCP {
		switch next {
		case unix.IPPROTO_AH:
			next, off = ip[off], off+(int(ip[off+1])+2)*4
		default:
			next, off = ip[off], off+(int(ip[off+1])+1)*8
		}
	}
	l4 := ip[off : 40+int(binary.BigEndian.Uint16(ip[4:]))]
	p.sport, p.dport = binary.BigEndian.Uint16(l4[0:]), binary.BigEndian.Uint16(l4[2:])
	p.ipOK = true // no IPv6 header checksum
	p.tcpOK = binary.BigEndian.Uint16(l4[16:]) == tcpCsum6(p.src, p.dst, l4)
	return p
}

// skbCtx is a struct __sk_buff for BPF_PROG_TEST_RUN with mark and ifindex set.
func skbCtx(mark uint32) []byte {
	ctx := make([]byte, 192)
	binary.NativeEndian.PutUint32(ctx[8:], mark) // mark
	binary.NativeEndian.PutUint32(ctx[40:], 1)   // ifindex: lo
	return ctx
}

func (f *fixture) run(t *testing.T, prog *ebpf.Program, pkt []byte, mark uint32) (int32, []byte) {
	t.Helper()
	out := make([]byte, len(pkt)+256)
	opts := &ebpf.RunOptions{Data: pkt, DataOut: out, Context: skbCtx(mark), ContextOut: make([]byte, 192)}
	ret, err := prog.Run(opts)
	if err != nil {
		t.Fatalf("test run: %v", err)
	}
	return int32(ret), opts.DataOut
}

func (f *fixture) counter(t *testing.T, r Rule) uint64 {
	t.Helper()
	counts, err := f.dp.Counts(f.cookie)
	if err != nil {
		t.Fatal(err)
	}
	return counts[Count{r, FamilyV4}] + counts[Count{r, FamilyV6}]
}

func TestIngressLeavesAlone(t *testing.T) {
	f := newFixture(t)
	for _, tc := range []struct {
		name string
		pkt  tcpPacket
		mark uint32
		rule Rule
	}{
		{"from probe address", tcpPacket{src: probeIP, dst: podIP, sport: 40000, dport: 8080, syn: true}, 0, RuleInProbe},
		{"to 127.0.0.1", tcpPacket{src: remoteIP, dst: localhost, sport: 40001, dport: 8080, syn: true}, 0, RuleInUntouched},
		{"to hbone port", tcpPacket{src: remoteIP, dst: podIP, sport: 40002, dport: 15008, syn: true}, 0, RuleInUntouched},
		{"proxy mark", tcpPacket{src: remoteIP, dst: podIP, sport: 40003, dport: 8080, syn: true}, 0x539, RuleInUntouched},
		{"proxy mark under mask", tcpPacket{src: remoteIP, dst: podIP, sport: 40004, dport: 8080, syn: true}, 0x1539, RuleInUntouched},
		{"syn-ack is not a new connection", tcpPacket{src: remoteIP, dst: podIP, sport: 80, dport: 40005, syn: true, ack: true}, 0, 0},
		{"ack of an unknown flow", tcpPacket{src: remoteIP, dst: podIP, sport: 40006, dport: 8080, ack: true}, 0, 0},
		{"udp", tcpPacket{src: remoteIP, dst: podIP, sport: 40007, dport: 8080, proto: unix.IPPROTO_UDP}, 0, 0},
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

func TestIngressRedirectsNewConnections(t *testing.T) {
	f := newFixture(t)
	for _, tc := range []struct {
		name string
		pkt  tcpPacket
		mark uint32
	}{
		{"to the pod address", tcpPacket{src: remoteIP, dst: podIP, sport: 41000, dport: 8080, syn: true}, 0},
		{"to a secondary address: REDIRECT uses the primary", tcpPacket{src: remoteIP, dst: secondIP, sport: 41001, dport: 8080, syn: true}, 0},
		{"mark that only looks like the proxy's", tcpPacket{src: remoteIP, dst: podIP, sport: 41002, dport: 8080, syn: true}, 0x53a},
		{"with IP options", tcpPacket{src: remoteIP, dst: podIP, sport: 41003, dport: 9090, syn: true, ipOptions: []byte{1, 1, 1, 0}}, 0},
		{"to the outbound port", tcpPacket{src: remoteIP, dst: podIP, sport: 41004, dport: 15001, syn: true}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := f.counter(t, RuleInRedirect)
			ret, out := f.run(t, f.dp.PodIngress, tc.pkt.bytes(), tc.mark)
			if ret != tcxNext {
				t.Fatalf("verdict %d, want next", ret)
			}
			p := parse(t, out)
			if p.dst != podIP || p.dport != 15006 || p.src != tc.pkt.src || p.sport != tc.pkt.sport {
				t.Fatalf("got %v:%d -> %v:%d, want -> %v:15006", p.src, p.sport, p.dst, p.dport, podIP)
			}
			if !p.ipOK || !p.tcpOK {
				t.Fatalf("checksums broken: ip ok %v, tcp ok %v", p.ipOK, p.tcpOK)
			}
			var fl InFlow
			if err := f.dp.InFlows.Lookup(FlowKey{Netns: f.cookie, Addr: Addr(tc.pkt.src), Port: tc.pkt.sport}, &fl); err != nil {
				t.Fatalf("no flow entry: %v", err)
			}
			if fl.Orig != Addr(tc.pkt.dst) || fl.OrigPort != tc.pkt.dport || fl.New != Addr(podIP) {
				t.Fatalf("flow entry %+v", fl)
			}
			if f.counter(t, RuleInRedirect) != before+1 {
				t.Fatal("redirect not counted")
			}

			// A later packet of the same connection follows its SYN.
			later := tc.pkt
			later.syn, later.ack = false, true
			ret, out = f.run(t, f.dp.PodIngress, later.bytes(), 0)
			p = parse(t, out)
			if ret != tcxNext || p.dst != podIP || p.dport != 15006 || !p.tcpOK || !p.ipOK {
				t.Fatalf("later packet: verdict %d, %v:%d, checksums %v/%v", ret, p.dst, p.dport, p.ipOK, p.tcpOK)
			}

			// The reply from 15006 leaves as if from the original destination.
			reply := tcpPacket{src: podIP, dst: tc.pkt.src, sport: 15006, dport: tc.pkt.sport, syn: true, ack: true}
			ret, out = f.run(t, f.dp.PodEgress, reply.bytes(), 0)
			p = parse(t, out)
			if ret != tcxNext || p.src != tc.pkt.dst || p.sport != tc.pkt.dport || !p.tcpOK || !p.ipOK {
				t.Fatalf("reply: verdict %d, from %v:%d, checksums %v/%v; want from %v:%d", ret, p.src, p.sport, p.ipOK, p.tcpOK, tc.pkt.dst, tc.pkt.dport)
			}
		})
	}
}

func TestIngressExemptSYNForgetsEarlierFlow(t *testing.T) {
	f := newFixture(t)
	syn := tcpPacket{src: remoteIP, dst: podIP, sport: 42000, dport: 8080, syn: true}
	f.run(t, f.dp.PodIngress, syn.bytes(), 0)
	// Same remote port, now to the HBONE port: not redirected, and the old
	// entry must not capture it.
	hb := tcpPacket{src: remoteIP, dst: podIP, sport: 42000, dport: 15008, syn: true}
	f.run(t, f.dp.PodIngress, hb.bytes(), 0)
	var fl InFlow
	if err := f.dp.InFlows.Lookup(FlowKey{Netns: f.cookie, Addr: Addr(remoteIP), Port: 42000}, &fl); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Fatalf("stale flow entry kept: %+v, %v", fl, err)
	}
}

func TestIngressFailsClosed(t *testing.T) {
	f := newFixture(t)
	for _, tc := range []struct {
		name  string
		pkt   tcpPacket
		setup func(t *testing.T)
	}{
		{"tcp fragment", tcpPacket{src: remoteIP, dst: podIP, sport: 43000, dport: 8080, syn: true, fragOff: 0x2000}, nil},
		{"later tcp fragment", tcpPacket{src: remoteIP, dst: podIP, sport: 43001, dport: 8080, fragOff: 0x0010}, nil},
		{"truncated tcp header", tcpPacket{src: remoteIP, dst: podIP, sport: 43002, dport: 8080, syn: true, truncateTCPAfter: 10}, nil},
		{"interface without state", tcpPacket{src: remoteIP, dst: podIP, sport: 43003, dport: 8080, syn: true}, func(t *testing.T) {
			if err := f.dp.Ifaces.Delete(IfaceKey{Netns: f.cookie, Ifindex: 1}); err != nil {
				t.Fatal(err)
			}
		}},
		{"interface without an address", tcpPacket{src: remoteIP, dst: podIP, sport: 43004, dport: 8080, syn: true}, func(t *testing.T) {
			if err := f.dp.Ifaces.Put(IfaceKey{Netns: f.cookie, Ifindex: 1}, IfaceInfo{}); err != nil {
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
				t.Fatalf("verdict %d, want drop (%d)", ret, tcxDrop)
			}
		})
	}
}

func TestEgressLeavesOthersAlone(t *testing.T) {
	f := newFixture(t)
	for _, tc := range []tcpPacket{
		{src: podIP, dst: remoteIP, sport: 15006, dport: 44000, syn: true, ack: true}, // no such flow
		{src: podIP, dst: remoteIP, sport: 8080, dport: 44001, ack: true},             // app talking directly
		{src: podIP, dst: remoteIP, sport: 44002, dport: 80, syn: true},               // proxy connecting out
	} {
		in := tc.bytes()
		ret, out := f.run(t, f.dp.PodEgress, in, 0)
		if ret != tcxNext || string(out) != string(in) {
			t.Fatalf("%v:%d -> %v:%d: verdict %d, changed %v", tc.src, tc.sport, tc.dst, tc.dport, ret, string(out) != string(in))
		}
	}
}

func TestPinAndOpen(t *testing.T) {
	requireBPF(t)
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		t.Skipf("cannot mount bpffs (needs CAP_SYS_ADMIN): %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	cfg := config.Default()
	cfg.RouteTable, cfg.MaxFlows = 321, 1024
	dp, err := Load(cfg, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	if err := dp.Pin(dir + "/dp"); err != nil {
		t.Fatal(err)
	}
	again, err := Open(dir+"/dp", &cfg, Options{})
	if err != nil {
		t.Fatal(err)
	}
	live, err := again.LiveConfig()
	again.Close()
	if err != nil || live != cfg {
		t.Fatalf("live config %+v (%v), loaded with %+v", live, err, cfg)
	}
	for name, mod := range map[string]func(*config.Config){
		"inbound port": func(c *config.Config) { c.InboundPort = 15999 },
		"route table":  func(c *config.Config) { c.RouteTable = 100 },
		"max flows":    func(c *config.Config) { c.MaxFlows = 65536 },
	} {
		other := cfg
		mod(&other)
		if _, err := Open(dir+"/dp", &other, Options{}); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("Open with another %s: %v", name, err)
		}
	}
	if _, err := Open(dir+"/dp", nil, Options{Schema: Schema + 1}); !errors.Is(err, ErrUpgradeNeeded) {
		t.Errorf("a binary of a newer schema opened an older store: %v", err)
	}
	newer, err := Load(cfg, Options{Schema: Schema + 1})
	if err != nil {
		t.Fatal(err)
	}
	defer newer.Close()
	if err := newer.Pin(dir + "/newer"); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir+"/newer", nil, Options{}); !errors.Is(err, ErrNewerSchema) {
		t.Errorf("a binary of an older schema opened a newer store: %v", err)
	}
}
