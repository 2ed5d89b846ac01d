// Package rules names the rules of the reference ruleset, as the datapath
// counts them, and decides a connection the way the datapath does, for
// `explain`. Its decisions are checked against the programs' own counters on
// live traffic (test/observe_test.go).
package rules

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"strings"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/reference"
)

// Rule is the datapath's rule number.
type Rule = datapath.Rule

// Info describes one counted rule.
type Info struct {
	Rule  Rule
	Name  string // short, stable: metrics label and JSON
	Chain string // where it sits in the reference
	// Text is the reference's own line (iptables-save format), or a note for
	// what is not a line of it.
	Text string
}

// All lists every counted rule, in the reference's order.
func All() []Info {
	out := []Info{
		{datapath.RuleOutProbe, "out-probe", "nat ISTIO_OUTPUT 1", ""},
		{datapath.RuleOutConnMark, "out-connmark", "nat ISTIO_OUTPUT 2", ""},
		{datapath.RuleOutLocal, "out-local", "nat ISTIO_OUTPUT 3", ""},
		{datapath.RuleOutRedirect, "out-redirect", "nat ISTIO_OUTPUT 4", ""},
		{datapath.RuleOutUntouched, "out-untouched", "nat ISTIO_OUTPUT (end)", "no rule matched: to 127.0.0.1, or a proxy socket (mark 0x539/0xfff); not redirected"},
		{datapath.RuleInProbe, "in-probe", "nat ISTIO_PRERT 1", ""},
		{datapath.RuleInRedirect, "in-redirect", "nat ISTIO_PRERT 2", ""},
		{datapath.RuleInUntouched, "in-untouched", "nat ISTIO_PRERT (end)", "no rule matched: to 127.0.0.1, to the HBONE port, or marked 0x539/0xfff; not redirected"},
		{datapath.RuleConnMarkRestore, "connmark-restore", "mangle ISTIO_OUTPUT 1", ""},
		{datapath.RuleFailClosed, "fail-closed", "ebpf-redirect", "refused or dropped: no state for the pod, or a map update failed (fail closed)"},
	}
	lines := referenceLines()
	for i := range out {
		if out[i].Text == "" {
			out[i].Text = lines[out[i].Chain]
		}
	}
	return out
}

// ByRule finds a rule's Info.
func ByRule(r Rule) Info {
	for _, i := range All() {
		if i.Rule == r {
			return i
		}
	}
	return Info{Rule: r, Name: fmt.Sprintf("rule-%d", r), Chain: "unknown"}
}

// referenceLines indexes the -A lines of the embedded ruleset as
// "table CHAIN n".
func referenceLines() map[string]string {
	out := map[string]string{}
	table := ""
	n := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(reference.Rules))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "*"):
			table = line[1:]
		case strings.HasPrefix(line, "-A "):
			chain := strings.Fields(line)[1]
			k := table + " " + chain
			n[k]++
			out[fmt.Sprintf("%s %d", k, n[k])] = line
		}
	}
	return out
}

// Query is a connection to explain.
type Query struct {
	Inbound bool
	UDP     bool
	Src     netip.AddrPort // inbound: the remote peer
	Dst     netip.AddrPort
	Mark    uint32 // the socket's (outbound) or packet's (inbound) mark
}

// Pod is the live state the decision reads.
type Pod struct {
	Local   map[netip.Addr]bool // addresses the pod's namespace owns
	Primary netip.Addr          // primary address of the interface traffic arrives on
}

// Decision is what happens to a connection.
type Decision struct {
	Rule       Info   `json:"rule"`
	Redirected bool   `json:"redirected"`
	To         string `json:"to"`   // where the connection goes
	Note       string `json:"note"` // what the parties see
}

func hasMark(c config.Config, mark, want uint32) bool { return mark&c.MarkMask == want }

// Decide applies the rules in their order, as bpf/outbound.c and
// bpf/inbound.c do.
func Decide(c config.Config, p Pod, q Query) Decision {
	lo := netip.MustParseAddr("127.0.0.1")
	if q.UDP {
		return Decision{Rule: Info{Name: "not-tcp", Chain: "-p tcp", Text: "only TCP is redirected"}, To: q.Dst.String(), Note: "untouched"}
	}
	if !q.Inbound {
		dst := q.Dst.Addr()
		if dst.IsUnspecified() {
			dst = lo // connect(0.0.0.0) is routed as 127.0.0.1
		}
		direct := Decision{To: q.Dst.String(), Note: "not redirected: the connection goes straight to its destination"}
		switch {
		case dst == c.ProbeAddr:
			direct.Rule = ByRule(datapath.RuleOutProbe)
		case hasMark(c, q.Mark, c.ConnMark):
			direct.Rule = ByRule(datapath.RuleOutConnMark)
			direct.Note = fmt.Sprintf("not redirected; the policy route (fwmark %#x/%#x lookup %d) delivers it locally", c.ConnMark, c.MarkMask, c.RouteTable)
		case dst != lo && (dst.Is4() && dst.As4()[0] == 127 || p.Local[dst]):
			direct.Rule = ByRule(datapath.RuleOutLocal)
			direct.Note = "not redirected: the destination is the pod's own (routed through lo)"
		case dst != lo && !hasMark(c, q.Mark, c.ProxyMark):
			return Decision{Rule: ByRule(datapath.RuleOutRedirect), Redirected: true,
				To:   fmt.Sprintf("127.0.0.1:%d", c.OutboundPort),
				Note: fmt.Sprintf("redirected to the proxy's outbound listener; the proxy reads %s as SO_ORIGINAL_DST, the application still sees %s as its peer", q.Dst, q.Dst)}
		default:
			direct.Rule = ByRule(datapath.RuleOutUntouched)
		}
		return direct
	}
	direct := Decision{To: q.Dst.String(), Note: "not redirected: reaches the application's listener directly"}
	switch {
	case q.Src.Addr() == c.ProbeAddr:
		direct.Rule = ByRule(datapath.RuleInProbe)
	case q.Dst.Addr() != lo && q.Dst.Port() != c.HBONEPort && !hasMark(c, q.Mark, c.ProxyMark):
		if !p.Primary.IsValid() {
			return Decision{Rule: ByRule(datapath.RuleFailClosed), To: "dropped", Note: "the interface has no address; REDIRECT drops"}
		}
		return Decision{Rule: ByRule(datapath.RuleInRedirect), Redirected: true,
			To:   fmt.Sprintf("%s:%d", p.Primary, c.InboundPort),
			Note: fmt.Sprintf("redirected to the proxy's inbound listener; the proxy reads %s as SO_ORIGINAL_DST and the peer sees replies from %s", q.Dst, q.Dst)}
	default:
		direct.Rule = ByRule(datapath.RuleInUntouched)
	}
	return direct
}
