package equiv

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
)

var fixed = map[uint16]bool{80: true, 8080: true, 15001: true, 15006: true, 15008: true}

func TestNormalizeLabelsPortsInOrderOfAppearance(t *testing.T) {
	in := []string{
		"client: local=10.77.0.2:40001 peer=10.77.0.1:80",
		"proxy 15001: local=[::ffff:127.0.0.1]:15001 peer=[::ffff:10.77.0.2]:40001 up=10.77.0.2:35000->10.77.0.1:80",
		"server: peer=10.77.0.2:35000 other=10.77.0.9:50000",
	}
	want := []string{
		"client: local=10.77.0.2:eph1 peer=10.77.0.1:80",
		"proxy 15001: local=[::ffff:127.0.0.1]:15001 peer=[::ffff:10.77.0.2]:eph1 up=10.77.0.2:eph2->10.77.0.1:80",
		"server: peer=10.77.0.2:eph2 other=10.77.0.9:eph3",
	}
	if got := Normalize(in, fixed); !slices.Equal(got, want) {
		t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestNormalizeLeavesNonAddressesAlone(t *testing.T) {
	in := []string{`server peer:80: request="REQ x 1048576 intact" mark=0x539 bytes=20/29`}
	if got := Normalize(in, fixed); got[0] != in[0] {
		t.Fatalf("changed: %s", got[0])
	}
}

// outboundRecord is a typical redirected outbound connection with the given ports.
func outboundRecord(backend string, clientPort, upPort uint16, serverSeesPort uint16) *Record {
	ap := func(a string, p uint16) string {
		return netip.AddrPortFrom(netip.MustParseAddr(a), p).String()
	}
	return &Record{
		Case: "c", Backend: backend, Fixed: fixed,
		Client: standin.DialResult{Outcome: "ok", Local: ap("10.77.0.2", clientPort), Peer: "10.77.0.1:80", Reply: "RESP peer:80 c 0 intact"},
		Proxy: []standin.ProxyEvent{{
			Listener: 15001, OrigDst: "10.77.0.1:80", OrigDstFrom: "SO_ORIGINAL_DST/len=128",
			Local: "[::ffff:127.0.0.1]:15001", Peer: ap("::ffff:10.77.0.2", clientPort),
			Action: "relayed", UpLocal: ap("10.77.0.2", upPort), UpPeer: "10.77.0.1:80", BytesUp: 10, BytesDown: 20,
		}},
		Servers: []standin.ServerEvent{{Name: "peer:80", Proto: "tcp", Local: "10.77.0.1:80", Peer: ap("10.77.0.2", serverSeesPort), Request: "REQ c 0 intact"}},
	}
}

func TestCompareIgnoresEphemeralValues(t *testing.T) {
	a := outboundRecord("iptables", 40001, 35000, 35000)
	b := outboundRecord("ebpf", 51234, 47000, 47000)
	if d := Compare(a, b); d != "" {
		t.Fatalf("unexpected diff:\n%s", d)
	}
}

func TestCompareDetectsBrokenPortRelation(t *testing.T) {
	a := outboundRecord("iptables", 40001, 35000, 35000)
	// The server sees the client's own port instead of the proxy's upstream port.
	b := outboundRecord("ebpf", 40001, 35000, 40001)
	d := Compare(a, b)
	if d == "" {
		t.Fatal("no diff")
	}
	if !strings.Contains(d, "- server peer:80: proto=tcp local=10.77.0.1:80 peer=10.77.0.2:eph2") ||
		!strings.Contains(d, "+ server peer:80: proto=tcp local=10.77.0.1:80 peer=10.77.0.2:eph1") {
		t.Fatalf("diff does not show the server line:\n%s", d)
	}
	// The landing changes too: the relayed connection no longer matches a server.
	if !strings.Contains(d, "+ landing: proxy:15001>?10.77.0.1:80,peer:80") {
		t.Fatalf("diff does not show the landing:\n%s", d)
	}
}

func TestCompareDetectsFixedPortAndAddressChanges(t *testing.T) {
	a := outboundRecord("iptables", 40001, 35000, 35000)
	b := outboundRecord("ebpf", 40001, 35000, 35000)
	b.Proxy[0].Local = "[::ffff:10.77.0.2]:15001" // e.g. a rewrite that kept the pod address
	if Compare(a, b) == "" {
		t.Fatal("address change not detected")
	}
	c := outboundRecord("ebpf", 40001, 35000, 35000)
	c.Servers[0].Mark = 0x111
	if Compare(a, c) == "" {
		t.Fatal("mark change not detected")
	}
	d := outboundRecord("ebpf", 40001, 35000, 35000)
	d.Proxy[0].OrigDstFrom = "getsockname"
	if Compare(a, d) == "" {
		t.Fatal("original destination method change not detected")
	}
}

func TestCanonicalOrderDoesNotDependOnEventOrderOrPorts(t *testing.T) {
	mk := func(p1, p2 uint16, swap bool) *Record {
		s1 := standin.ServerEvent{Name: "app:8080", Proto: "tcp", Local: "10.77.0.2:8080", Peer: netip.AddrPortFrom(netip.MustParseAddr("10.77.0.1"), p1).String()}
		s2 := standin.ServerEvent{Name: "peer:80", Proto: "tcp", Local: "10.77.0.1:80", Peer: netip.AddrPortFrom(netip.MustParseAddr("10.77.0.2"), p2).String()}
		r := &Record{Backend: "x", Fixed: fixed, Client: standin.DialResult{Outcome: "ok"}, Servers: []standin.ServerEvent{s1, s2}}
		if swap {
			r.Servers = []standin.ServerEvent{s2, s1}
		}
		return r
	}
	// Ephemeral ports in opposite numeric order, events in opposite order.
	if d := Compare(mk(40000, 50000, false), mk(50000, 40000, true)); d != "" {
		t.Fatalf("unexpected diff:\n%s", d)
	}
}

func TestLanding(t *testing.T) {
	rec := outboundRecord("iptables", 40001, 35000, 35000)
	if l := rec.Landing(); l != "proxy:15001>peer:80" {
		t.Errorf("relayed: %s", l)
	}
	for _, tc := range []struct {
		rec  *Record
		want string
	}{
		{&Record{Client: standin.DialResult{Outcome: "refused"}}, "refused"},
		{&Record{Proxy: []standin.ProxyEvent{{Listener: 15001, Action: "dial-failed:refused"}}}, "proxy:15001>dial-failed:refused"},
		{&Record{Proxy: []standin.ProxyEvent{{Listener: 15008, Action: "served"}}}, "proxy:15008"},
		{&Record{Servers: []standin.ServerEvent{{Name: "peer:80"}, {Name: "app:8080"}}}, "app:8080,peer:80"},
		// A dual-stack app sees the proxy's upstream as v4-mapped: still matched.
		{&Record{
			Proxy:   []standin.ProxyEvent{{Listener: 15006, Action: "relayed", UpLocal: "10.77.0.1:41000", UpPeer: "10.77.0.2:8080"}},
			Servers: []standin.ServerEvent{{Name: "app:8080", Local: "[::ffff:10.77.0.2]:8080", Peer: "[::ffff:10.77.0.1]:41000"}},
		}, "proxy:15006>app:8080"},
	} {
		if got := tc.rec.Landing(); got != tc.want {
			t.Errorf("landing %q, want %q", got, tc.want)
		}
	}
}

func TestTrivial(t *testing.T) {
	for outcome, trivial := range map[string]bool{"timeout": true, "ok": true, "refused": false, "unreachable": false} {
		r := &Record{Client: standin.DialResult{Outcome: outcome}}
		if got := r.Trivial() != nil; got != trivial {
			t.Errorf("%s: trivial=%v", outcome, got)
		}
	}
	if err := outboundRecord("x", 1, 2, 2).Trivial(); err != nil {
		t.Error(err)
	}
}

func TestDiffMarksRemovedAndAdded(t *testing.T) {
	d := Diff("a", "b", []string{"x", "y", "z"}, []string{"x", "Y", "z", "w"})
	want := "--- a\n+++ b\n  x\n- y\n+ Y\n  z\n+ w\n"
	if d != want {
		t.Fatalf("got\n%s\nwant\n%s", d, want)
	}
}

func TestCasesAreWellFormed(t *testing.T) {
	cs := AllCases()
	if len(cs) < 28 {
		t.Fatalf("only %d cases", len(cs))
	}
	seen := map[string]bool{}
	for _, c := range cs {
		if c.Name == "" || strings.ContainsAny(c.Name, " /") || seen[c.Name] {
			t.Errorf("bad or duplicate name %q", c.Name)
		}
		seen[c.Name] = true
		if c.Expect == "" || c.Description == "" {
			t.Errorf("%s: no Expect or Description", c.Name)
		}
		switch c.Client {
		case ClientApp, ClientPeer, ClientProxy, ClientMovedApp, ClientSubCgroupApp, ClientNetnsApp:
		default:
			t.Errorf("%s: client %q", c.Name, c.Client)
		}
		if (c.KnownDifference == "") != (c.EbpfExpect == "") {
			t.Errorf("%s: KnownDifference and EbpfExpect go together", c.Name)
		}
		if c.EbpfExpect == c.Expect && c.EbpfExpect != "" {
			t.Errorf("%s: a known difference that lands where the reference does", c.Name)
		}
		if _, err := netip.ParseAddrPort(c.Dial.Dst); err != nil {
			t.Errorf("%s: dst: %v", c.Name, err)
		}
		d := c.dialSpec()
		if !c.FixedPorts()[netip.MustParseAddrPort(d.Dst).Port()] {
			t.Errorf("%s: the dialled port is not fixed", c.Name)
		}
	}
	if _, ok := CaseByName("in-probe-source"); !ok {
		t.Error("the mutation test's case is missing")
	}
}
