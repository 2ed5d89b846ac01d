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
// they must never rewrite anything but a well-formed IPv4 TCP packet of a
// connection they decided to redirect (its SYN, or a later packet of a flow a
// SYN recorded), must never record a flow for anything else, and must return
// only the verdicts they are meant to.
//
// `go test` runs the seeds below; `go test -fuzz FuzzIngress ./internal/datapath`
// (as root) searches further.

// tcpView is the Go model of what the programs accept as IPv4 TCP.
type tcpView struct {
	ok                 bool // structurally valid: what the kernel's IP and TCP input would accept
	src, dst           netip.Addr
	sport, dport       uint16
	syn, ack, fin, rst bool
}

func viewTCP(b []byte) tcpView {
	var v tcpView
	if len(b) < 14+20 || binary.BigEndian.Uint16(b[12:]) != unix.ETH_P_IP {
		return v
	}
	ip := b[14:]
	ihl := int(ip[0]&0xf) * 4
	if ip[0]>>4 != 4 || ihl < 20 || ip[9] != unix.IPPROTO_TCP {
		return v
	}
	if binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 { // MF or an offset: a fragment
		return v
	}
	if len(ip) < ihl+20 {
		return v
	}
	tcp := ip[ihl:]
	doff := int(tcp[12]>>4) * 4
	tot := int(binary.BigEndian.Uint16(ip[2:]))
	if doff < 20 || tot > len(ip) || tot < ihl+doff {
		return v
	}
	v.ok = true
	v.src, v.dst = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
	v.sport, v.dport = binary.BigEndian.Uint16(tcp[0:]), binary.BigEndian.Uint16(tcp[2:])
	fl := tcp[13]
	v.fin, v.syn, v.rst, v.ack = fl&0x01 != 0, fl&0x02 != 0, fl&0x04 != 0, fl&0x10 != 0
	return v
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
			if exists && (!existed || after.OrigIp != before.OrigIp || after.OrigPort != before.OrigPort || after.NewIp != before.NewIp) && !newSYN {
				t.Fatalf("a packet that is not a new connection recorded a flow: %+v", after)
			}
		} else if ret == tcxNext && !bytes.Equal(out, data) {
			t.Fatalf("a packet that is not well-formed IPv4 TCP was rewritten")
		}
		if ret != tcxNext || bytes.Equal(out, data) {
			return
		}
		// It was rewritten: it must be a redirect, done properly.
		redirected := v.syn && !v.ack && v.src != probeIP && v.dst != localhost && v.dport != 15008 && mark&0xfff != 0x539
		followed := !(v.syn && !v.ack) && existed && before.OrigIp == be32(v.dst) && before.OrigPort == v.dport
		if !redirected && !followed {
			t.Fatalf("rewrote a packet that is neither a redirected SYN nor of a recorded flow: %+v", v)
		}
		ihl := int(data[14]&0xf) * 4
		l4 := 14 + ihl
		if !sameExcept(data, out, [2]int{24, 26}, [2]int{30, 34}, [2]int{l4 + 2, l4 + 4}, [2]int{l4 + 16, l4 + 18}) {
			t.Fatal("bytes other than the destination and the checksums changed")
		}
		if got := viewTCP(out); got.dst != podIP || got.dport != 15006 {
			t.Fatalf("rewritten to %v:%d, want %v:15006", got.dst, got.dport, podIP)
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
		// A recorded flow, for the seeds' replies from 15006 (a seed's
		// reset or close may have removed it).
		if err := fx.dp.InFlows.Put(FlowKey{Netns: fx.cookie, Ip: be32(remoteIP), Port: 40000},
			InFlow{OrigIp: be32(podIP), OrigPort: 8080, NewIp: be32(podIP)}); err != nil {
			t.Fatal(err)
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
			// Only for a reply to a local socket marked as the proxy's; the
			// test's namespace has none.
			t.Fatalf("redirected to lo without a proxy socket: %+v", v)
		default:
			t.Fatalf("verdict %d", ret)
		}
		if ret != tcxNext || bytes.Equal(out, data) {
			return
		}
		if !v.ok || v.sport != 15006 || !existed || be32(v.src) != before.NewIp {
			t.Fatalf("rewrote a packet that is not a reply of a recorded flow: %+v", v)
		}
		ihl := int(data[14]&0xf) * 4
		l4 := 14 + ihl
		if !sameExcept(data, out, [2]int{24, 30}, [2]int{l4, l4 + 2}, [2]int{l4 + 16, l4 + 18}) {
			t.Fatal("bytes other than the source and the checksums changed")
		}
		if got := viewTCP(out); got.src != netip.AddrFrom4(ipBytes(before.OrigIp)) || got.sport != before.OrigPort {
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
			ip := data[14:]
			if ifindex == 1 || len(ip) < 20 || ip[9] != unix.IPPROTO_TCP || binary.BigEndian.Uint16(data[12:]) != unix.ETH_P_IP {
				t.Fatalf("refused something other than TCP on an uncaptured interface")
			}
			ihl := int(ip[0]&0xf) * 4
			if len(ip) < ihl+14 || ip[ihl+13]&0x12 != 0x02 {
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
