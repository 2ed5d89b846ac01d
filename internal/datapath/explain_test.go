package datapath

import (
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// The explain program runs the rule functions the hooks run, through
// BPF_PROG_TEST_RUN, on the maps of a live (unpinned) datapath: every branch
// of both chains, and the state it reads (the pod's entry, its local
// addresses, its interfaces' primary addresses). It changes no counter.
func TestExplainDecidesAsTheRules(t *testing.T) {
	f := newFixture(t)
	pod := f.cookie
	if err := f.dp.Pods.Put(pod, PodInfo{Ip4: be32(podIP)}); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{podIP, secondIP} {
		if err := f.dp.LocalAddrs.Put(LocalKey{Netns: pod, Addr: Addr(a)}, uint8(1)); err != nil {
			t.Fatal(err)
		}
	}
	// ifindex 1 (the fixture's) has podIP; ifindex 7 has no address.
	if err := f.dp.Ifaces.Put(IfaceKey{Netns: pod, Ifindex: 7}, IfaceInfo{}); err != nil {
		t.Fatal(err)
	}
	ap := netip.MustParseAddrPort
	out := func(dst string, mark, dev uint32) ExplainQuery {
		d := ap(dst)
		return ExplainQuery{Netns: pod, Dst: Addr(d.Addr()), Dport: d.Port(), Mark: mark, Ifindex: dev, Proto: unix.IPPROTO_TCP}
	}
	in := func(src, dst string, mark, ifindex uint32) ExplainQuery {
		q := out(dst, mark, ifindex)
		q.Inbound, q.Src = 1, Addr(ap(src).Addr())
		return q
	}
	udp := out("10.9.0.1:53", 0, 0)
	udp.Proto = unix.IPPROTO_UDP
	noPod := out("10.9.0.1:80", 0, 0)
	noPod.Netns = pod + 1
	for _, tc := range []struct {
		name string
		q    ExplainQuery
		rule Rule
		to   string
	}{
		{"redirect", out("10.9.0.1:80", 0, 0), RuleOutRedirect, "127.0.0.1:15001"},
		{"probe", out("169.254.7.127:80", 0, 0), RuleOutProbe, "169.254.7.127:80"},
		{"conn mark", out("10.9.0.1:80", 0x111, 0), RuleOutConnMark, "10.9.0.1:80"},
		{"conn mark under the mask", out("10.9.0.1:80", 0x7111, 0), RuleOutConnMark, "10.9.0.1:80"},
		{"own address", out("10.9.0.2:8080", 0, 0), RuleOutLocal, "10.9.0.2:8080"},
		{"own secondary address", out("10.9.0.3:8080", 0, 0), RuleOutLocal, "10.9.0.3:8080"},
		{"127.0.0.2", out("127.0.0.2:8080", 0, 0), RuleOutLocal, "127.0.0.2:8080"},
		{"bound to lo", out("10.9.0.1:80", 0, 1), RuleOutLocal, "10.9.0.1:80"},
		{"bound to another device", out("10.9.0.1:80", 0, 7), RuleOutRedirect, "127.0.0.1:15001"},
		{"127.0.0.1", out("127.0.0.1:8080", 0, 0), RuleOutUntouched, "127.0.0.1:8080"},
		{"0.0.0.0", out("0.0.0.0:8080", 0, 0), RuleOutUntouched, "0.0.0.0:8080"},
		{"proxy mark", out("10.9.0.1:80", 0x539, 0), RuleOutUntouched, "10.9.0.1:80"},
		{"proxy mark under the mask", out("10.9.0.1:80", 0x1539, 0), RuleOutUntouched, "10.9.0.1:80"},
		{"not the proxy mark", out("10.9.0.1:80", 0x53a, 0), RuleOutRedirect, "127.0.0.1:15001"},
		{"no state for the pod", noPod, RuleFailClosed, "10.9.0.1:80"},
		{"udp", udp, RuleNone, "10.9.0.1:53"},
		{"inbound redirect", in("10.9.0.1:4000", "10.9.0.3:8080", 0, 1), RuleInRedirect, "10.9.0.2:15006"},
		{"inbound probe", in("169.254.7.127:4000", "10.9.0.2:8080", 0, 1), RuleInProbe, "10.9.0.2:8080"},
		{"inbound hbone", in("10.9.0.1:4000", "10.9.0.2:15008", 0, 1), RuleInUntouched, "10.9.0.2:15008"},
		{"inbound 127.0.0.1", in("10.9.0.1:4000", "127.0.0.1:8080", 0, 1), RuleInUntouched, "127.0.0.1:8080"},
		{"inbound proxy mark", in("10.9.0.1:4000", "10.9.0.2:8080", 0x539, 1), RuleInUntouched, "10.9.0.2:8080"},
		{"inbound on an interface without an address", in("10.9.0.1:4000", "10.9.0.2:8080", 0, 7), RuleFailClosed, "[::]:15006"},
		{"inbound on an unknown interface", in("10.9.0.1:4000", "10.9.0.2:8080", 0, 8), RuleFailClosed, "[::]:15006"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ans, err := f.dp.Explain(tc.q)
			if err != nil {
				t.Fatal(err)
			}
			to := netip.AddrPortFrom(AddrOf(ans.To), ans.ToPort).String()
			if Rule(ans.Rule) != tc.rule || to != tc.to {
				t.Errorf("got %v -> %s, want %v -> %s", Rule(ans.Rule), to, tc.rule, tc.to)
			}
		})
	}
	for r := Rule(0); r < RuleMax; r++ {
		if n := f.counter(t, r); n != 0 {
			t.Errorf("explain moved the counter of %v to %d", r, n)
		}
	}
}
