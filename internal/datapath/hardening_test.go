package datapath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
)

const tcxRedirect = 7

// newSizedFixture is newFixture with a config of other capacities.
func newSizedFixture(t testing.TB, size func(*config.Config)) *fixture {
	requireBPF(t)
	cfg := config.Default()
	if size != nil {
		size(&cfg)
	}
	dp, err := Load(cfg, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dp.Close)
	f := &fixture{dp: dp, cookie: hostCookie(t)}
	if err := dp.Ifaces.Put(IfaceKey{Netns: f.cookie, Ifindex: 1}, IfaceInfo{Primary4: be32(podIP), Primary6: Addr(podIP6), Ll6: Addr(podLL6)}); err != nil {
		t.Fatal(err)
	}
	return f
}

// runCtx runs a program on a packet with a given __sk_buff (mark, ifindex).
func runCtx(t testing.TB, prog *ebpf.Program, pkt []byte, ctx []byte) (int32, []byte) {
	t.Helper()
	out := make([]byte, len(pkt)+256)
	opts := &ebpf.RunOptions{Data: pkt, DataOut: out, Context: ctx, ContextOut: make([]byte, len(ctx))}
	ret, err := prog.Run(opts)
	if err != nil {
		t.Fatalf("test run: %v", err)
	}
	return int32(ret), opts.DataOut
}

func (f *fixture) flow(t testing.TB, src netip.Addr, sport uint16) (InFlow, bool) {
	t.Helper()
	var fl InFlow
	err := f.dp.InFlows.Lookup(FlowKey{Netns: f.cookie, Addr: Addr(src), Port: sport}, &fl)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return fl, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return fl, true
}

// Lengths that do not add up are what the kernel drops; the programs must
// not act on them (and drop them first on ingress: fail closed).
func TestIngressRejectsInconsistentLengths(t *testing.T) {
	f := newFixture(t)
	syn := func(sport uint16) tcpPacket {
		return tcpPacket{src: remoteIP, dst: podIP, sport: sport, dport: 8080, syn: true}
	}
	for _, tc := range []struct {
		name string
		pkt  tcpPacket
	}{
		{"IP length beyond the packet", func() tcpPacket { p := syn(45000); p.totLenDelta = 10; return p }()},
		{"IP length shorter than the TCP header", func() tcpPacket { p := syn(45001); p.totLenDelta = -15; return p }()},
		{"IP length shorter than the IP header", func() tcpPacket { p := syn(45002); p.totLenDelta = -30; return p }()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := tc.pkt.bytes()
			ret, _ := f.run(t, f.dp.PodIngress, in, 0)
			if ret != tcxDrop {
				t.Fatalf("verdict %d, want drop", ret)
			}
			if _, ok := f.flow(t, tc.pkt.src, tc.pkt.sport); ok {
				t.Fatal("a flow was recorded for a malformed packet")
			}
			ret, out := f.run(t, f.dp.PodEgress, in, 0)
			if ret != tcxNext || !bytes.Equal(out, in) {
				t.Fatalf("egress: verdict %d, changed %v", ret, !bytes.Equal(out, in))
			}
		})
	}
	t.Run("link-layer padding is not part of the packet", func(t *testing.T) {
		p := syn(45010)
		p.payload = []byte{}
		p.trailer = []byte{0xde, 0xad, 0xbe, 0xef, 0, 0}
		in := p.bytes()
		ret, out := f.run(t, f.dp.PodIngress, in, 0)
		got := parse(t, out)
		if ret != tcxNext || got.dst != podIP || got.dport != 15006 || !got.ipOK || !got.tcpOK {
			t.Fatalf("verdict %d, %v:%d, checksums %v/%v", ret, got.dst, got.dport, got.ipOK, got.tcpOK)
		}
		if !bytes.Equal(out[len(out)-len(p.trailer):], p.trailer) {
			t.Fatal("padding changed")
		}
	})
}

// A redirected inbound connection's entry lives as long as the connection:
// it goes when both FINs are acknowledged, or on a reset, and not on a
// forged FIN or reset.
func TestInboundFlowIsForgottenWhenTheConnectionEnds(t *testing.T) {
	f := newFixture(t)
	const remoteISN, proxyISN = 1000, 5000
	in := func(sport uint16, mod func(*tcpPacket)) tcpPacket {
		p := tcpPacket{src: remoteIP, dst: podIP, sport: sport, dport: 8080, ack: true, payload: []byte{}}
		mod(&p)
		return p
	}
	out := func(sport uint16, mod func(*tcpPacket)) tcpPacket {
		p := tcpPacket{src: podIP, dst: remoteIP, sport: 15006, dport: sport, ack: true, payload: []byte{}}
		mod(&p)
		return p
	}
	ingress := func(t *testing.T, p tcpPacket) {
		t.Helper()
		ret, b := f.run(t, f.dp.PodIngress, p.bytes(), 0)
		if got := parse(t, b); ret != tcxNext || got.dport != 15006 {
			t.Fatalf("ingress %+v: verdict %d, to port %d", p, ret, got.dport)
		}
	}
	egress := func(t *testing.T, p tcpPacket) {
		t.Helper()
		ret, b := f.run(t, f.dp.PodEgress, p.bytes(), 0)
		if got := parse(t, b); ret != tcxNext || got.sport != 8080 {
			t.Fatalf("egress %+v: verdict %d, from port %d", p, ret, got.sport)
		}
	}
	handshake := func(t *testing.T, sport uint16) {
		t.Helper()
		ingress(t, in(sport, func(p *tcpPacket) { p.ack, p.syn, p.seq = false, true, remoteISN }))
		egress(t, out(sport, func(p *tcpPacket) { p.syn, p.seq, p.ackSeq = true, proxyISN, remoteISN+1 }))
		ingress(t, in(sport, func(p *tcpPacket) { p.seq, p.ackSeq, p.payload = remoteISN+1, proxyISN+1, []byte("hello") }))
	}
	mustExist := func(t *testing.T, sport uint16, step string) {
		t.Helper()
		if _, ok := f.flow(t, remoteIP, sport); !ok {
			t.Fatalf("entry gone after %s", step)
		}
	}
	mustBeGone := func(t *testing.T, sport uint16, step string) {
		t.Helper()
		if fl, ok := f.flow(t, remoteIP, sport); ok {
			t.Fatalf("entry kept after %s: %+v", step, fl)
		}
	}

	t.Run("remote closes first", func(t *testing.T) {
		const sport = 46000
		handshake(t, sport)
		// remote FIN after its 5 bytes: ends at 1000+1+5+1
		ingress(t, in(sport, func(p *tcpPacket) { p.fin, p.seq, p.ackSeq = true, remoteISN+6, proxyISN+1 }))
		mustExist(t, sport, "the remote's FIN")
		ingress(t, in(sport, func(p *tcpPacket) { p.rst, p.ack, p.seq = true, false, 424242 }))
		mustExist(t, sport, "a reset at a wrong sequence number")
		egress(t, out(sport, func(p *tcpPacket) { p.seq, p.ackSeq = proxyISN+1, remoteISN+7 }))
		mustExist(t, sport, "the proxy's ACK of it")
		egress(t, out(sport, func(p *tcpPacket) { p.fin, p.seq, p.ackSeq, p.payload = true, proxyISN+1, remoteISN+7, []byte("bye") }))
		mustExist(t, sport, "the proxy's FIN")
		ingress(t, in(sport, func(p *tcpPacket) { p.seq, p.ackSeq = remoteISN+7, proxyISN+4 }))
		mustExist(t, sport, "an ACK short of the proxy's FIN")
		ingress(t, in(sport, func(p *tcpPacket) { p.seq, p.ackSeq = remoteISN+7, proxyISN+5 }))
		mustBeGone(t, sport, "the last ACK")
	})
	t.Run("proxy closes first", func(t *testing.T) {
		const sport = 46001
		handshake(t, sport)
		egress(t, out(sport, func(p *tcpPacket) { p.fin, p.seq, p.ackSeq = true, proxyISN+1, remoteISN+6 }))
		ingress(t, in(sport, func(p *tcpPacket) { p.seq, p.ackSeq = remoteISN+6, proxyISN+2 }))
		mustExist(t, sport, "the ACK of the proxy's FIN")
		ingress(t, in(sport, func(p *tcpPacket) { p.fin, p.seq, p.ackSeq = true, remoteISN+6, proxyISN+2 }))
		mustExist(t, sport, "the remote's FIN")
		egress(t, out(sport, func(p *tcpPacket) { p.seq, p.ackSeq = proxyISN+2, remoteISN+7 }))
		mustBeGone(t, sport, "the proxy's ACK of the remote's FIN")
	})
	t.Run("a forged FIN is never acknowledged", func(t *testing.T) {
		const sport = 46002
		handshake(t, sport)
		ingress(t, in(sport, func(p *tcpPacket) { p.fin, p.seq = true, 77777 }))
		egress(t, out(sport, func(p *tcpPacket) { p.fin, p.seq, p.ackSeq = true, proxyISN+1, remoteISN+6 }))
		ingress(t, in(sport, func(p *tcpPacket) { p.seq, p.ackSeq = remoteISN+6, proxyISN+2 }))
		mustExist(t, sport, "a forged FIN and the proxy's own close")
	})
	t.Run("reset by the proxy", func(t *testing.T) {
		const sport = 46003
		handshake(t, sport)
		egress(t, out(sport, func(p *tcpPacket) { p.rst, p.seq = true, proxyISN+1 }))
		mustBeGone(t, sport, "the proxy's reset")
	})
	t.Run("reset by the remote", func(t *testing.T) {
		const sport = 46004
		ingress(t, in(sport, func(p *tcpPacket) { p.ack, p.syn, p.seq = false, true, remoteISN }))
		ingress(t, in(sport, func(p *tcpPacket) { p.rst, p.ack, p.seq = true, false, 0 }))
		mustExist(t, sport, "a reset before the proxy acknowledged anything")
		egress(t, out(sport, func(p *tcpPacket) { p.syn, p.seq, p.ackSeq = true, proxyISN, remoteISN+1 }))
		ingress(t, in(sport, func(p *tcpPacket) { p.rst, p.ack, p.seq = true, false, remoteISN+2 }))
		mustExist(t, sport, "a reset off the acknowledged sequence number")
		ingress(t, in(sport, func(p *tcpPacket) { p.rst, p.ack, p.seq = true, false, remoteISN+1 }))
		mustBeGone(t, sport, "the remote's reset")
	})
}

// hostIface is a non-loopback interface of the test's namespace, for the
// programs that look at the arrival interface.
func hostIface(t testing.TB) int {
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range ifs {
		if i.Flags&net.FlagLoopback == 0 {
			return i.Index
		}
	}
	t.Skip("no interface besides lo in the test's network namespace")
	return 0
}

func sockIngressCtx(ifindex int) []byte {
	ctx := make([]byte, 192)
	binary.NativeEndian.PutUint32(ctx[40:], uint32(ifindex))
	return ctx
}

// A new connection to a pod socket through an interface without the tc
// programs (one added after attach) is refused; everything else passes.
func TestSockIngressRefusesUncapturedInterfaces(t *testing.T) {
	f := newFixture(t)
	other := hostIface(t)
	syn := tcpPacket{src: remoteIP, dst: podIP, sport: 47000, dport: 8080, syn: true}
	ack := tcpPacket{src: remoteIP, dst: podIP, sport: 47000, dport: 8080, ack: true}
	udp := tcpPacket{src: remoteIP, dst: podIP, sport: 47000, dport: 8080, proto: unix.IPPROTO_UDP}
	synAck := tcpPacket{src: remoteIP, dst: podIP, sport: 80, dport: 47001, syn: true, ack: true}
	check := func(t *testing.T, p tcpPacket, ifindex int, want int32) {
		t.Helper()
		before := f.counter(t, RuleFailClosed)
		ret, _ := runCtx(t, f.dp.PodSockIngress, p.bytes(), sockIngressCtx(ifindex))
		if ret != want {
			t.Fatalf("verdict %d, want %d", ret, want)
		}
		if wantCount := before + uint64(1-want); f.counter(t, RuleFailClosed) != wantCount {
			t.Fatalf("fail-closed counter %d, want %d", f.counter(t, RuleFailClosed), wantCount)
		}
	}
	t.Run("SYN on lo", func(t *testing.T) { check(t, syn, 1, 1) })
	t.Run("SYN on an interface without state", func(t *testing.T) { check(t, syn, other, 0) })
	t.Run("ACK on an interface without state", func(t *testing.T) { check(t, ack, other, 1) })
	t.Run("SYN-ACK on an interface without state", func(t *testing.T) { check(t, synAck, other, 1) })
	t.Run("UDP on an interface without state", func(t *testing.T) { check(t, udp, other, 1) })
	if err := f.dp.Ifaces.Put(IfaceKey{Netns: f.cookie, Ifindex: uint32(other)}, IfaceInfo{Primary4: be32(podIP)}); err != nil {
		t.Fatal(err)
	}
	t.Run("SYN on a captured interface", func(t *testing.T) { check(t, syn, other, 1) })
}

// A full map of per-pod state refuses the new entry: attach fails cleanly
// instead of leaving a pod half described.
func TestShrunkMapsAreFull(t *testing.T) {
	f := newSizedFixture(t, func(c *config.Config) { c.MaxPods = 1 })
	if err := f.dp.Pods.Put(uint64(1), PodInfo{}); err != nil {
		t.Fatal(err)
	}
	if err := f.dp.Pods.Put(uint64(2), PodInfo{}); err == nil {
		t.Fatal("a pods map of 1 entry took a second one")
	}
	for a := uint32(1); a <= 16; a++ {
		if err := f.dp.LocalAddrs.Put(LocalKey{Netns: 1, Addr: [4]uint32{0, 0, 0, a}}, uint8(1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.dp.LocalAddrs.Put(LocalKey{Netns: 1, Addr: [4]uint32{0, 0, 0, 17}}, uint8(1)); err == nil {
		t.Fatal("a local_addrs map sized for 1 pod (16 addresses) took a 17th")
	}
}
