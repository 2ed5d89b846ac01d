package rules

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
)

func TestEveryRuleHasItsReferenceLine(t *testing.T) {
	for _, i := range All() {
		if i.Text == "" || i.Name == "" {
			t.Errorf("rule %v has no text or name: %+v", i.Rule, i)
		}
	}
	if got := ByRuleName(t, "out-redirect").Text; !strings.Contains(got, "REDIRECT --to-ports 15001") {
		t.Errorf("out-redirect text = %q", got)
	}
	if got := ByRuleName(t, "in-probe").Text; !strings.Contains(got, "-s 169.254.7.127/32") {
		t.Errorf("in-probe text = %q", got)
	}
}

func ByRuleName(t *testing.T, name string) Info {
	for _, i := range All() {
		if i.Name == name {
			return i
		}
	}
	t.Fatalf("no rule %s", name)
	return Info{}
}

func TestDecide(t *testing.T) {
	c := config.Default()
	pod := Pod{Local: map[netip.Addr]bool{netip.MustParseAddr("10.0.0.2"): true}, Primary: netip.MustParseAddr("10.0.0.2")}
	ap := netip.MustParseAddrPort
	for _, tc := range []struct {
		q    Query
		rule string
		to   string
	}{
		{Query{Dst: ap("10.0.0.1:80")}, "out-redirect", "127.0.0.1:15001"},
		{Query{Dst: ap("169.254.7.127:80")}, "out-probe", "169.254.7.127:80"},
		{Query{Dst: ap("10.0.0.1:80"), Mark: 0x111}, "out-connmark", "10.0.0.1:80"},
		{Query{Dst: ap("10.0.0.2:8080")}, "out-local", "10.0.0.2:8080"},
		{Query{Dst: ap("127.0.0.2:8080")}, "out-local", "127.0.0.2:8080"},
		{Query{Dst: ap("127.0.0.1:8080")}, "out-untouched", "127.0.0.1:8080"},
		{Query{Dst: ap("0.0.0.0:8080")}, "out-untouched", "0.0.0.0:8080"},
		{Query{Dst: ap("10.0.0.1:80"), Mark: 0x1539}, "out-untouched", "10.0.0.1:80"},
		{Query{Dst: ap("10.0.0.1:80"), Mark: 0x53a}, "out-redirect", "127.0.0.1:15001"},
		{Query{Inbound: true, Src: ap("10.0.0.1:4000"), Dst: ap("10.0.0.3:8080")}, "in-redirect", "10.0.0.2:15006"},
		{Query{Inbound: true, Src: ap("169.254.7.127:4000"), Dst: ap("10.0.0.2:8080")}, "in-probe", "10.0.0.2:8080"},
		{Query{Inbound: true, Src: ap("10.0.0.1:4000"), Dst: ap("10.0.0.2:15008")}, "in-untouched", "10.0.0.2:15008"},
		{Query{Inbound: true, Src: ap("10.0.0.1:4000"), Dst: ap("10.0.0.2:8080"), Mark: 0x539}, "in-untouched", "10.0.0.2:8080"},
		{Query{UDP: true, Dst: ap("10.0.0.1:53")}, "not-tcp", "10.0.0.1:53"},
	} {
		d := Decide(c, pod, tc.q)
		if d.Rule.Name != tc.rule || d.To != tc.to {
			t.Errorf("%+v: got %s -> %s, want %s -> %s", tc.q, d.Rule.Name, d.To, tc.rule, tc.to)
		}
	}
}
