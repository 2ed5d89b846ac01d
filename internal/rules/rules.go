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

// Info describes one counted rule.
type Info struct {
	Rule  Rule   `json:"-"`
	Name  string `json:"name"`  // short, stable: metrics label and JSON
	Chain string `json:"chain"` // where it sits in the reference
	// Text is the reference's line (iptables-save format) with the node's
	// values, or a note for what is not a line of it.
	Text string `json:"text"`
}

// All lists every counted rule, in the reference's order, rendered with c.
func All(c config.Config) []Info {
	mark := func(m uint32) string { return fmt.Sprintf("%#x/%#x", m, c.MarkMask) }
	return []Info{
		{datapath.RuleOutProbe, "out-probe", "nat ISTIO_OUTPUT 1",
			fmt.Sprintf("-A ISTIO_OUTPUT -d %s/32 -p tcp -m tcp -j ACCEPT", c.ProbeAddr)},
		{datapath.RuleOutConnMark, "out-connmark", "nat ISTIO_OUTPUT 2",
			fmt.Sprintf("-A ISTIO_OUTPUT -p tcp -m mark --mark %s -j ACCEPT", mark(c.ConnMark))},
		{datapath.RuleOutLocal, "out-local", "nat ISTIO_OUTPUT 3",
			"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT"},
		{datapath.RuleOutRedirect, "out-redirect", "nat ISTIO_OUTPUT 4",
			fmt.Sprintf("-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark %s -j REDIRECT --to-ports %d", mark(c.ProxyMark), c.OutboundPort)},
		{datapath.RuleOutUntouched, "out-untouched", "nat ISTIO_OUTPUT (end)",
			fmt.Sprintf("no rule matched: to 127.0.0.1, or a proxy socket (mark %s); not redirected", mark(c.ProxyMark))},
		{datapath.RuleInProbe, "in-probe", "nat ISTIO_PRERT 1",
			fmt.Sprintf("-A ISTIO_PRERT -s %s/32 -p tcp -m tcp -j ACCEPT", c.ProbeAddr)},
		{datapath.RuleInRedirect, "in-redirect", "nat ISTIO_PRERT 2",
			fmt.Sprintf("-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport %d -m mark ! --mark %s -j REDIRECT --to-ports %d", c.HBONEPort, mark(c.ProxyMark), c.InboundPort)},
		{datapath.RuleInUntouched, "in-untouched", "nat ISTIO_PRERT (end)",
			fmt.Sprintf("no rule matched: to 127.0.0.1, to the HBONE port %d, or marked %s; not redirected", c.HBONEPort, mark(c.ProxyMark))},
		{datapath.RuleConnMarkRestore, "connmark-restore", "mangle ISTIO_OUTPUT 1",
			fmt.Sprintf("-A ISTIO_OUTPUT -m connmark --mark %s -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff", mark(c.ConnMark))},
		{datapath.RuleFailClosed, "fail-closed", "ebpf-redirect",
			"refused or dropped: no state for the pod or its interface, or a map update failed (fail closed)"},
	}
}

// notTCP is what decides a connection that is not TCP: no rule (both chains
// match -p tcp only).
var notTCP = Info{Rule: datapath.RuleNone, Name: "not-tcp", Chain: "-p tcp", Text: "only TCP is redirected"}

// ByRule finds a rule's Info, rendered with c.
func ByRule(c config.Config, r Rule) Info {
	if r == datapath.RuleNone {
		return notTCP
	}
	for _, i := range All(c) {
		if i.Rule == r {
			return i
		}
	}
	return Info{Rule: r, Name: fmt.Sprintf("rule-%d", r), Chain: "unknown"}
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
func Describe(c config.Config, q Query, r Rule, to netip.AddrPort) Decision {
	d := Decision{Rule: ByRule(c, r), To: to.String()}
	switch r {
	case datapath.RuleNone:
		d.Note = "untouched"
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
