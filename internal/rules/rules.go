// Package rules names the rules of the reference ruleset as the datapath
// counts them, renders each as the reference's line with the node's live
// config, and words the datapath's decisions for `explain`. It decides
// nothing itself: the decisions come from the programs (bpf/explain.c).
package rules

import (
	"fmt"
	"net/netip"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
)

// Rule is the datapath's rule number.
type Rule = datapath.Rule

// Info describes one counted rule of one family's ruleset.
type Info struct {
	Rule   Rule   `json:"-"`
	Family string `json:"family"` // "ipv4" (iptables) or "ipv6" (ip6tables)
	Name   string `json:"name"`   // short, stable: metrics label and JSON
	Chain  string `json:"chain"`  // where it sits in the reference
	// Text is the reference's line (iptables-save format) with the node's
	// values, or a note for what is not a line of it.
	Text string `json:"text"`
}

// Family names.
const (
	IPv4 = "ipv4"
	IPv6 = "ipv6"
)

// FamilyName names a datapath family.
func FamilyName(f uint8) string {
	if f == datapath.FamilyV6 {
		return IPv6
	}
	return IPv4
}

// All lists every counted rule, in the reference's order, rendered with c:
// the IPv4 ruleset's, then (when IPv6 is captured) the IPv6 one's.
func All(c config.Config) []Info {
	out := family(c, datapath.FamilyV4)
	if c.IPv6 {
		out = append(out, family(c, datapath.FamilyV6)...)
	}
	return out
}

func family(c config.Config, f uint8) []Info {
	mark := func(m uint32) string { return fmt.Sprintf("%#x/%#x", m, c.MarkMask) }
	probe, lo := c.ProbeAddr.String()+"/32", "127.0.0.1/32"
	if f == datapath.FamilyV6 {
		probe, lo = c.ProbeAddr6.String()+"/128", "::1/128"
	}
	fam := FamilyName(f)
	return []Info{
		{datapath.RuleOutProbe, fam, "out-probe", "nat ISTIO_OUTPUT 1",
			fmt.Sprintf("-A ISTIO_OUTPUT -d %s -p tcp -m tcp -j ACCEPT", probe)},
		{datapath.RuleOutConnMark, fam, "out-connmark", "nat ISTIO_OUTPUT 2",
			fmt.Sprintf("-A ISTIO_OUTPUT -p tcp -m mark --mark %s -j ACCEPT", mark(c.ConnMark))},
		{datapath.RuleOutLocal, fam, "out-local", "nat ISTIO_OUTPUT 3",
			fmt.Sprintf("-A ISTIO_OUTPUT ! -d %s -o lo -j ACCEPT", lo)},
		{datapath.RuleOutRedirect, fam, "out-redirect", "nat ISTIO_OUTPUT 4",
			fmt.Sprintf("-A ISTIO_OUTPUT ! -d %s -p tcp -m mark ! --mark %s -j REDIRECT --to-ports %d", lo, mark(c.ProxyMark), c.OutboundPort)},
		{datapath.RuleOutUntouched, fam, "out-untouched", "nat ISTIO_OUTPUT (end)",
			fmt.Sprintf("no rule matched: to %s, or a proxy socket (mark %s); not redirected", lo, mark(c.ProxyMark))},
		{datapath.RuleInProbe, fam, "in-probe", "nat ISTIO_PRERT 1",
			fmt.Sprintf("-A ISTIO_PRERT -s %s -p tcp -m tcp -j ACCEPT", probe)},
		{datapath.RuleInRedirect, fam, "in-redirect", "nat ISTIO_PRERT 2",
			fmt.Sprintf("-A ISTIO_PRERT ! -d %s -p tcp -m tcp ! --dport %d -m mark ! --mark %s -j REDIRECT --to-ports %d", lo, c.HBONEPort, mark(c.ProxyMark), c.InboundPort)},
		{datapath.RuleInUntouched, fam, "in-untouched", "nat ISTIO_PRERT (end)",
			fmt.Sprintf("no rule matched: to %s, to the HBONE port %d, or marked %s; not redirected", lo, c.HBONEPort, mark(c.ProxyMark))},
		{datapath.RuleConnMarkRestore, fam, "connmark-restore", "mangle ISTIO_OUTPUT 1",
			fmt.Sprintf("-A ISTIO_OUTPUT -m connmark --mark %s -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff", mark(c.ConnMark))},
		{datapath.RuleFailClosed, fam, "fail-closed", "ebpf-redirect",
			"refused or dropped: no state for the pod or its interface, or a map update failed (fail closed)"},
	}
}

// notTCP is what decides a connection that is not TCP: no rule (both chains
// match -p tcp only).
var notTCP = Info{Rule: datapath.RuleNone, Name: "not-tcp", Chain: "-p tcp", Text: "only TCP is redirected"}

// noIPv6 decides IPv6 when IPv6 is not captured.
var noIPv6 = Info{Rule: datapath.RuleNone, Family: IPv6, Name: "no-ipv6-rules", Chain: "ip6tables", Text: "IPv6 is not captured on this node (--ipv6=false): as with no ip6tables rules"}

// ByRule finds a rule's Info in a family's ruleset, rendered with c.
func ByRule(c config.Config, r Rule, f uint8) Info {
	if r == datapath.RuleNone {
		if f == datapath.FamilyV6 && !c.IPv6 {
			return noIPv6
		}
		i := notTCP
		i.Family = FamilyName(f)
		return i
	}
	for _, i := range family(c, f) {
		if i.Rule == r {
			return i
		}
	}
	return Info{Rule: r, Family: FamilyName(f), Name: fmt.Sprintf("rule-%d", r), Chain: "unknown"}
}

// Query is a connection to explain.
type Query struct {
	Inbound bool
	UDP     bool
	Src     netip.AddrPort // inbound: the remote peer
	Dst     netip.AddrPort
	Mark    uint32 // the socket's (outbound) or packet's (inbound) mark
	// Device is the interface an outbound socket is bound to
	// (SO_BINDTODEVICE), "" for none; Iface the interface an inbound
	// connection arrives on ("": the one holding Dst, else the first).
	Device string
	Iface  string
}

// Decision is what happens to a connection.
type Decision struct {
	Rule       Info   `json:"rule"`
	Redirected bool   `json:"redirected"`
	To         string `json:"to"`   // where the connection goes
	Note       string `json:"note"` // what the parties see
}

// Describe words the datapath's answer to q: the rule it applied and where
// the connection goes.
func Describe(c config.Config, q Query, r Rule, f uint8, to netip.AddrPort) Decision {
	d := Decision{Rule: ByRule(c, r, f), To: to.String()}
	switch r {
	case datapath.RuleNone:
		d.Note = "untouched: " + d.Rule.Text
	case datapath.RuleOutRedirect:
		d.Redirected = true
		d.Note = fmt.Sprintf("redirected to the proxy's outbound listener; the proxy reads %s as SO_ORIGINAL_DST, the application still sees %s as its peer", q.Dst, q.Dst)
	case datapath.RuleInRedirect:
		d.Redirected = true
		d.Note = fmt.Sprintf("redirected to the proxy's inbound listener; the proxy reads %s as SO_ORIGINAL_DST and the peer sees replies from %s", q.Dst, q.Dst)
	case datapath.RuleOutConnMark:
		d.Note = fmt.Sprintf("not redirected; the policy route (fwmark %#x/%#x lookup %d) delivers it locally", c.ConnMark, c.MarkMask, c.RouteTable)
	case datapath.RuleOutLocal:
		d.Note = "not redirected: the destination is the pod's own (routed through lo)"
	case datapath.RuleFailClosed:
		d.To = "refused"
		d.Note = "the pod has no state in the datapath: the connect is refused"
		if q.Inbound {
			d.To = "dropped"
			d.Note = "the interface has no address (or no state): REDIRECT drops"
		}
	default:
		if q.Inbound {
			d.Note = "not redirected: reaches the application's listener directly"
		} else {
			d.Note = "not redirected: the connection goes straight to its destination"
		}
	}
	return d
}
