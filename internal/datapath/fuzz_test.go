package datapath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
)

// The tc programs run on whatever arrives. Fuzzed through BPF_PROG_TEST_RUN,
// they must never rewrite anything but a well-formed TCP packet of a
// connection they decided to redirect (its SYN, or a later packet of a flow a
// SYN recorded), must never record a flow for anything else, and must return
// only the verdicts they are meant to.
//
// `go test` runs the seeds below; `go test -fuzz FuzzIngress ./internal/datapath`
// (as root) searches further.

// tcpView is the Go model of what the programs accept as TCP, of both
// families.
type tcpView struct {
	ok                 bool // structurally valid: what the kernel's IP and TCP input would accept
	v6                 bool
	src, dst           netip.Addr
	sport, dport       uint16
	syn, ack, fin, rst bool
	l4                 int // offset of the TCP header in the frame
}

func viewTCP(b []byte) tcpView {
	var v tcpView
	if len(b) < 14+20 {
		return v
	}
	var tot int
	switch binary.BigEndian.Uint16(b[12:]) {
	case unix.ETH_P_IP:
		ip := b[14:]
		ihl := int(ip[0]&0xf) * 4
		if ip[0]>>4 != 4 || ihl < 20 || ip[9] != unix.IPPROTO_TCP {
			return v
		}
		if binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 { // MF or an offset: a fragment
			return v
		}
		v.src, v.dst = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		v.l4, tot = 14+ihl, int(binary.BigEndian.Uint16(ip[2:]))
	case unix.ETH_P_IPV6:
		ip := b[14:]
		if len(ip) < 40 || ip[0]>>4 != 6 {
			return v
		}
		next, off := ip[6], 40
		for i := 0; ; i++ {
			if next == unix.IPPROTO_TCP {
				break
			}
			if i == 8 || len(ip) < off+2 {
				return v
			}
			switch next {
			case unix.IPPROTO_HOPOPTS, unix.IPPROTO_ROUTING, unix.IPPROTO_DSTOPTS:
				next, off = ip[off], off+(int(ip[off+1])+1)*8
			case unix.IPPROTO_AH:
				next, off = ip[off], off+(int(ip[off+1])+2)*4
			default: // a fragment, or not TCP
				return v
			}
		}
		v.v6 = true
		v.src, v.dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
		v.l4, tot = 14+off, 40+int(binary.BigEndian.Uint16(ip[4:]))
	default:
		return v
	}
	if len(b) < v.l4+20 {
		return v
	}
	tcp := b[v.l4:]
	doff := int(tcp[12]>>4) * 4
	if doff < 20 || tot > len(b)-14 || tot < v.l4-14+doff {
		return v
	}
	v.ok = true
	v.sport, v.dport = binary.BigEndian.Uint16(tcp[0:]), binary.BigEndian.Uint16(tcp[2:])
	fl := tcp[13]
	v.fin, v.syn, v.rst, v.ack = fl&0x01 != 0, fl&0x02 != 0, fl&0x04 != 0, fl&0x10 != 0
	return v
}

// addrRange is where a frame's source (dst false) or destination address is.
func (v tcpView) addrRange(dst bool) [2]int {
	switch {
	case v.v6 && dst:
		return [2]int{14 + 24, 14 + 40}
	case v.v6:
		return [2]int{14 + 8, 14 + 24}
	case dst:
		return [2]int{14 + 16, 14 + 20}
	default:
		return [2]int{14 + 12, 14 + 16}
	}
}

// ipCsumRange is the IPv4 header checksum (none in IPv6).
func (v tcpView) ipCsumRange() [2]int {
	if v.v6 {
		return [2]int{0, 0}
	}
	return [2]int{14 + 10, 14 + 12}
}

// sameExcept reports whether a and b differ only inside the given byte ranges.
func sameExcept(a, b []byte, ranges ...[2]int) bool {
	if len(a) != len(b) {
		return false
	}
	a, b = bytes.Clone(a), bytes.Clone(b)
	for _, r := range ranges {
		for i := r[0]; i < r[1] && i < len(a); i++ {
			a[i], b[i] = 0, 0
		}
	}
	return bytes.Equal(a, b)
}

func fuzzSeeds(f *testing.F) {
	seeds := []tcpPacket{
		{src: remoteIP, dst: podIP, sport: 40000, dport: 8080, syn: true},
		{src: remoteIP, dst: podIP, sport: 40000, dport: 8080, ack: true},
		{src: remoteIP, dst: podIP, sport: 40000, dport: 8080, fin: true, ack: true},
		{src: remoteIP, dst: podIP, sport: 40000, dport: 8080, rst: true},
		{src: remoteIP, dst: podIP, sport: 40001, dport: 8080, syn: true, ipOptions: []byte{1, 1, 1, 0}},
		{src: remoteIP, dst: podIP, sport: 40002, dport: 8080, syn: true, fragOff: 0x2000},
		{src: remoteIP, dst: podIP, sport: 40003, dport: 8080, fragOff: 0x0010},
		{src: remoteIP, dst: podIP, sport: 40004, dport: 8080, syn: true, truncateTCPAfter: 10},
		{src: remoteIP, dst: podIP, sport: 40005, dport: 8080, syn: true, totLenDelta: 40},
		{src: remoteIP, dst: podIP, sport: 40006, dport: 8080, syn: true, totLenDelta: -15},
		{src: remoteIP, dst: podIP, sport: 40007, dport: 8080, syn: true, trailer: []byte{0, 0, 0, 0}},
		{src: remoteIP, dst: podIP, sport: 40008, dport: 8080, proto: unix.IPPROTO_UDP},
		{src: remoteIP, dst: podIP, sport: 40009, dport: 8080, proto: unix.IPPROTO_ICMP},
		{src: probeIP, dst: podIP, sport: 40010, dport: 8080, syn: true},
		{src: remoteIP, dst: podIP, sport: 40011, dport: 15008, syn: true},
		{src: remoteIP, dst: localhost, sport: 40012, dport: 8080, syn: true},
		{src: podIP, dst: remoteIP, sport: 15006, dport: 40000, syn: true, ack: true},
		{src: podIP, dst: remoteIP, sport: 15006, dport: 40000, fin: true, ack: true},
		{src: podIP, dst: remoteIP, sport: 15006, dport: 40000, rst: true},
		{src: podIP, dst: remoteIP, sport: 8080, dport: 40000, ack: true},
	}
	dst := []uint8{unix.IPPROTO_DSTOPTS}
	seeds = append(seeds,
		tcpPacket{src: remoteIP6, dst: podIP6, sport: 40000, dport: 8080, syn: true},
		tcpPacket{src: remoteIP6, dst: podIP6, sport: 40000, dport: 8080, ack: true},
		tcpPacket{src: remoteIP6, dst: podIP6, sport: 40000, dport: 8080, fin: true, ack: true},
		tcpPacket{src: remoteIP6, dst: podIP6, sport: 40000, dport: 8080, rst: true},
		tcpPacket{src: remoteLL6, dst: podLL6, sport: 40020, dport: 8080, syn: true},
		tcpPacket{src: remoteIP6, dst: podIP6, sport: 40021, dport: 8080, syn: true, ext: []uint8{unix.IPPROTO_HOPOPTS, unix.IPPROTO_ROUTING, unix.IPPROTO_DSTOPTS}},
		tcpPacket{src: remoteIP6, dst: podIP6, sport: 40022, dport: 8080, syn: true, ext: []uint8{unix.IPPROTO_AH}},
		tcpPacket{src: remoteIP6, dst: podIP6, sport: 40023, dport: 8080, syn: true, ext: []uint8{unix.IPPROTO_FRAGMENT}, fragOff: 1},
		tcpPacket{src: remoteIP6, dst: podIP6, sport: 40024, dport: 8080, syn: true, truncateTCPAfter: 10},
		tcpPacket{src: remoteIP6, dst: podIP6, sport: 40025, dport: 8080, syn: true, totLenDelta: 40},
		tcpPacket{src: remoteIP6, dst: podIP6, sport: 40026, dport: 8080, syn: true, totLenDelta: -15, ext: dst},
		tcpPacket{src: remoteIP6, dst: podIP6, sport: 40027, dport: 8080, proto: unix.IPPROTO_UDP},
		tcpPacket{src: probeIP6, dst: podIP6, sport: 40028, dport: 8080, syn: true},
		tcpPacket{src: remoteIP6, dst: localhost6, sport: 40029, dport: 8080, syn: true},
		tcpPacket{src: podIP6, dst: remoteIP6, sport: 15006, dport: 40000, syn: true, ack: true},
		tcpPacket{src: podIP6, dst: remoteIP6, sport: 15006, dport: 40000, fin: true, ack: true},
	)
	for _, s := range seeds {
		b := s.bytes()
		f.Add(b, uint32(0))
		f.Add(b, uint32(0x539))
	}
	// Frames that are not IPv4 at all, or barely a frame.
	f.Add(make([]byte, 14), uint32(0))
	f.Add(append([]byte{2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd}, make([]byte, 60)...), uint32(0))
	f.Add(append([]byte{2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00}, 0x4f, 0, 0, 20), uint32(0))
}

// fuzzInput bounds what is handed to the kernel: a frame of at least an
// Ethernet header (BPF_PROG_TEST_RUN refuses less) and at most a page.
func fuzzInput(data []byte) bool { return len(data) >= 14 && len(data) <= 4096 }

func FuzzIngress(f *testing.F) {
	fuzzSeeds(f)
	fx := newSizedFixture(f, func(c *config.Config) { c.MaxFlows = 64 })
	f.Fuzz(func(t *testing.T, data []byte, mark uint32) {
		if !fuzzInput(data) {
			return
		}
		v := viewTCP(data)
		var before InFlow
		existed := false
		if v.ok {
			before, existed = fx.flow(t, v.src, v.sport)
		}
		ret, out, ok := tryRun(t, fx.dp.PodIngress, data, skbCtx(mark))
		if !ok {
			return
		}
		if ret != tcxNext && ret != tcxDrop {
			t.Fatalf("verdict %d: ingress only passes on or drops", ret)
		}
		if v.ok {
			after, exists := fx.flow(t, v.src, v.sport)
			newSYN := v.syn && !v.ack
			if exists && (!existed || after.Orig != before.Orig || after.OrigPort != before.OrigPort || after.New != before.New) && !newSYN {
				t.Fatalf("a packet that is not a new connection recorded a flow: %+v", after)
			}
		} else if ret == tcxNext && !bytes.Equal(out, data) {
			t.Fatalf("a packet that is not well-formed IPv4 TCP was rewritten")
		}
		if ret != tcxNext || bytes.Equal(out, data) {
			return
		}
		// It was rewritten: it must be a redirect, done properly.
		redirected := v.syn && !v.ack && v.src != probeIP && v.src != probeIP6 && v.dst != localhost && v.dst != localhost6 &&
			v.dport != 15008 && mark&0xfff != 0x539
		followed := !(v.syn && !v.ack) && existed && before.Orig == Addr(v.dst) && before.OrigPort == v.dport
		if !redirected && !followed {
			t.Fatalf("rewrote a packet that is neither a redirected SYN nor of a recorded flow: %+v", v)
		}
		if !sameExcept(data, out, v.ipCsumRange(), v.addrRange(true), [2]int{v.l4 + 2, v.l4 + 4}, [2]int{v.l4 + 16, v.l4 + 18}) {
			t.Fatal("bytes other than the destination and the checksums changed")
		}
		want := podIP
		if v.v6 {
			want = podIP6
			if v.dst.IsLinkLocalUnicast() {
				want = podLL6
			}
		}
		if got := viewTCP(out); got.dst != want || got.dport != 15006 {
			t.Fatalf("rewritten to %v:%d, want %v:15006", got.dst, got.dport, want)
		}
	})
}

func FuzzEgress(f *testing.F) {
	fuzzSeeds(f)
	fx := newSizedFixture(f, func(c *config.Config) { c.MaxFlows = 64 })
	f.Fuzz(func(t *testing.T, data []byte, mark uint32) {
		if !fuzzInput(data) {
			return
		}
		// Recorded flows, for the seeds' replies from 15006 (a seed's reset
		// or close may have removed them).
		for _, fl := range []struct{ remote, pod netip.Addr }{{remoteIP, podIP}, {remoteIP6, podIP6}} {
			if err := fx.dp.InFlows.Put(FlowKey{Netns: fx.cookie, Addr: Addr(fl.remote), Port: 40000},
				InFlow{Orig: Addr(fl.pod), OrigPort: 8080, New: Addr(fl.pod)}); err != nil {
				t.Fatal(err)
			}
		}
		v := viewTCP(data)
		var before InFlow
		existed := false
		if v.ok {
			before, existed = fx.flow(t, v.dst, v.dport)
		}
		ret, out, ok := tryRun(t, fx.dp.PodEgress, data, skbCtx(mark))
		if !ok {
			return
		}
		switch ret {
		case tcxNext, tcxDrop:
		case tcxRedirect:
			// Only IPv6 TCP to ::1, which belongs to lo.
			if !v.ok || !v.v6 || v.dst != localhost6 {
				t.Fatalf("redirected something other than IPv6 TCP to ::1: %+v", v)
			}
			return
		default:
			t.Fatalf("verdict %d", ret)
		}
		if ret != tcxNext || bytes.Equal(out, data) {
			return
		}
		if !v.ok || v.sport != 15006 || !existed || Addr(v.src) != before.New {
			t.Fatalf("rewrote a packet that is not a reply of a recorded flow: %+v", v)
		}
		if !sameExcept(data, out, v.ipCsumRange(), v.addrRange(false), [2]int{v.l4, v.l4 + 2}, [2]int{v.l4 + 16, v.l4 + 18}) {
			t.Fatal("bytes other than the source and the checksums changed")
		}
		if got := viewTCP(out); got.src != AddrOf(before.Orig) || got.sport != before.OrigPort {
			t.Fatalf("reply rewritten to come from %v:%d", got.src, got.sport)
		}
	})
}

func FuzzSockIngress(f *testing.F) {
	fuzzSeeds(f)
	fx := newSizedFixture(f, nil)
	other := hostIface(f)
	f.Fuzz(func(t *testing.T, data []byte, mark uint32) {
		if !fuzzInput(data) {
			return
		}
		// The mark picks the arrival interface: lo or one without tc.
		ifindex := 1
		if mark&1 == 1 {
			ifindex = other
		}
		ret, out, ok := tryRun(t, fx.dp.PodSockIngress, data, sockIngressCtx(ifindex))
		if !ok {
			return
		}
		// The test run hands back the packet from its network header.
		if !bytes.Equal(out[14:], data[14:]) {
			t.Fatal("a cgroup_skb program changed the packet")
		}
		switch ret {
		case 1:
		case 0:
			// cgroup_skb programs see the packet from the IP header; the
			// frame's Ethernet header is stripped by the test run.
			v := viewTCP(data)
			if ifindex == 1 || !v.ok {
				t.Fatalf("refused something other than TCP on an uncaptured interface")
			}
			if !v.syn || v.ack {
				t.Fatalf("refused a TCP packet that is not a SYN")
			}
		default:
			t.Fatalf("verdict %d", ret)
		}
	})
}

// tryRun is a test run that tolerates the inputs BPF_PROG_TEST_RUN itself
// refuses (an IPv4 Ethernet type without a whole IP header): ok is false then.
func tryRun(t *testing.T, prog *ebpf.Program, data, ctx []byte) (int32, []byte, bool) {
	t.Helper()
	opts := &ebpf.RunOptions{Data: data, DataOut: make([]byte, len(data)+256), Context: ctx, ContextOut: make([]byte, len(ctx))}
	ret, err := prog.Run(opts)
	if errors.Is(err, unix.EINVAL) {
		return 0, nil, false
	}
	if err != nil {
		t.Fatalf("test run: %v", err)
	}
	return int32(ret), opts.DataOut, true
}

func ipBytes(be uint32) [4]byte {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], be)
	return b
}
