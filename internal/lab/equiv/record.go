package equiv

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
)

// Record is what every party observed in one run of a case under one backend.
type Record struct {
	Case    string
	Backend string
	Client  standin.DialResult
	// After is a second connection, made after the backend was removed (cases
	// with RemoveWhileOpen).
	After *standin.DialResult
	// Meanwhile is a second connection made while the first was open (cases
	// with Meanwhile).
	Meanwhile *standin.DialResult
	// StillOpen counts, by party, connections still open when the record was
	// taken (cases with RemoveWhileOpen, whose broken connections wait for
	// their time-outs).
	StillOpen map[string]int
	// Wire are the connection attempts sniffed on the wire (cases with Wire).
	Wire    []string
	Proxy   []standin.ProxyEvent
	Servers []standin.ServerEvent
	// Fixed are the case's meaningful ports; all others are normalized (see Lines).
	Fixed map[uint16]bool
}

// Landing summarizes where the connection went: "proxy:<port>" for each connection the
// proxy accepted, followed by ">" and the server its upstream connection reached or the
// proxy's action when it did not relay; then every server reached directly; and, when
// no one accepted anything, the client's outcome ("refused", "timeout"...).
func (r *Record) Landing() string {
	var parts []string
	used := make([]bool, len(r.Servers))
	for _, p := range r.sortedProxy() {
		s := fmt.Sprintf("%s:%d", standin.RoleProxy, p.Listener)
		switch p.Action {
		case standin.ActionServed:
		case standin.ActionRelayed:
			target := "?" + p.UpPeer
			for i, sv := range r.Servers {
				if !used[i] && sameEndpoint(sv.Peer, p.UpLocal) && sameEndpoint(sv.Local, p.UpPeer) {
					used[i], target = true, sv.Name
					break
				}
			}
			s += ">" + target
		default:
			s += ">" + p.Action
		}
		parts = append(parts, s)
	}
	var direct []string
	for i, sv := range r.Servers {
		if !used[i] {
			direct = append(direct, sv.Name)
		}
	}
	slices.Sort(direct)
	parts = append(parts, direct...)
	if len(parts) == 0 {
		return r.Client.Outcome
	}
	return strings.Join(parts, ",")
}

// sameEndpoint compares two printed socket addresses, v4-mapped or not.
func sameEndpoint(a, b string) bool {
	x, err1 := netip.ParseAddrPort(a)
	y, err2 := netip.ParseAddrPort(b)
	return err1 == nil && err2 == nil && x.Addr().Unmap() == y.Addr().Unmap() && x.Port() == y.Port()
}

// Trivial reports a record that proves nothing: nobody accepted, nothing refused and
// nothing was seen on the wire. A refusal is the peer's (ECONNREFUSED, ICMP port
// unreachable) or the kernel's own immediate verdict (ENETUNREACH/EHOSTUNREACH);
// silence (a time-out) is not, unless a sniffer saw where the attempt went.
func (r *Record) Trivial() error {
	refusal := r.Client.Outcome == standin.OutcomeRefused || r.Client.Outcome == standin.OutcomeUnreach
	if len(r.Proxy) == 0 && len(r.Servers) == 0 && len(r.Wire) == 0 && !refusal {
		return fmt.Errorf("trivial record: no party accepted and the client was not refused (client %s %s)",
			r.Client.Outcome, r.Client.Detail)
	}
	return nil
}

// addrRE finds socket addresses in a record's text: a.b.c.d:port, [v6]:port and
// [v6%zone]:port.
var addrRE = regexp.MustCompile(`(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9]+)?\]):(\d{1,5})\b`)

// maskPorts replaces every non-fixed port with "*": the key events are sorted by, so
// that the order does not depend on the ephemeral ports a run happened to get.
func maskPorts(s string, fixed map[uint16]bool) string {
	return addrRE.ReplaceAllStringFunc(s, func(m string) string {
		sub := addrRE.FindStringSubmatch(m)
		if p, err := strconv.Atoi(sub[2]); err == nil && fixed[uint16(p)] {
			return m
		}
		return sub[1] + ":*"
	})
}

// Normalize relabels every non-fixed port as eph1, eph2... in order of first appearance,
// the same port getting the same label everywhere: a relation such as "the server sees
// the client's own port" survives, the random value does not.
func Normalize(lines []string, fixed map[uint16]bool) []string {
	labels := map[string]string{}
	out := make([]string, len(lines))
	for i, l := range lines {
		out[i] = addrRE.ReplaceAllStringFunc(l, func(m string) string {
			sub := addrRE.FindStringSubmatch(m)
			if p, err := strconv.Atoi(sub[2]); err == nil && fixed[uint16(p)] {
				return m
			}
			lab, ok := labels[sub[2]]
			if !ok {
				lab = fmt.Sprintf("eph%d", len(labels)+1)
				labels[sub[2]] = lab
			}
			return sub[1] + ":" + lab
		})
	}
	return out
}

func proxyLine(p standin.ProxyEvent) string {
	s := fmt.Sprintf("proxy %d: orig=%s from=%s local=%s peer=%s action=%s",
		p.Listener, p.OrigDst, p.OrigDstFrom, p.Local, p.Peer, p.Action)
	if p.OrigDstAnswers != "" {
		s += " answers: " + p.OrigDstAnswers
	}
	if p.UpLocal != "" || p.UpPeer != "" {
		s += fmt.Sprintf(" up=%s->%s", p.UpLocal, p.UpPeer)
	}
	if p.Action == standin.ActionRelayed {
		s += fmt.Sprintf(" bytes=%d/%d", p.BytesUp, p.BytesDown)
	}
	if p.Request != "" {
		s += fmt.Sprintf(" request=%q", p.Request)
	}
	return s
}

func serverLine(e standin.ServerEvent) string {
	return fmt.Sprintf("server %s: proto=%s local=%s peer=%s mark=%#x request=%q",
		e.Name, e.Proto, e.Local, e.Peer, e.Mark, e.Request)
}

func (r *Record) sortedProxy() []standin.ProxyEvent {
	ps := slices.Clone(r.Proxy)
	slices.SortStableFunc(ps, func(a, b standin.ProxyEvent) int {
		return strings.Compare(maskPorts(proxyLine(a), r.Fixed), maskPorts(proxyLine(b), r.Fixed))
	})
	return ps
}

func (r *Record) sortedServers() []standin.ServerEvent {
	ss := slices.Clone(r.Servers)
	slices.SortStableFunc(ss, func(a, b standin.ServerEvent) int {
		return strings.Compare(maskPorts(serverLine(a), r.Fixed), maskPorts(serverLine(b), r.Fixed))
	})
	return ss
}

// RawLines is the record in canonical order, before normalization.
func (r *Record) RawLines() []string {
	c := r.Client
	lines := []string{fmt.Sprintf("client: outcome=%s local=%s peer=%s reply=%q", c.Outcome, c.Local, c.Peer, c.Reply)}
	if m := r.Meanwhile; m != nil {
		lines = append(lines, fmt.Sprintf("meanwhile: outcome=%s local=%s peer=%s reply=%q", m.Outcome, m.Local, m.Peer, m.Reply))
	}
	if a := r.After; a != nil {
		lines = append(lines, fmt.Sprintf("after removal: outcome=%s local=%s peer=%s reply=%q", a.Outcome, a.Local, a.Peer, a.Reply))
	}
	for _, p := range r.sortedProxy() {
		lines = append(lines, proxyLine(p))
	}
	for _, s := range r.sortedServers() {
		lines = append(lines, serverLine(s))
	}
	wire := slices.Clone(r.Wire)
	slices.SortFunc(wire, func(a, b string) int { return strings.Compare(maskPorts(a, r.Fixed), maskPorts(b, r.Fixed)) })
	for _, w := range wire {
		lines = append(lines, "wire "+w)
	}
	if len(r.StillOpen) > 0 {
		var open []string
		for role, n := range r.StillOpen {
			open = append(open, fmt.Sprintf("%s=%d", role, n))
		}
		slices.Sort(open)
		lines = append(lines, "still open: "+strings.Join(open, " "))
	}
	return append(lines, "landing: "+r.Landing())
}

// Lines is the canonical, normalized record: the thing compared across backends.
func (r *Record) Lines() []string { return Normalize(r.RawLines(), r.Fixed) }

func (r *Record) String() string { return strings.Join(r.Lines(), "\n") }

// Compare returns "" when the two records are equivalent, else a readable diff.
func Compare(want, got *Record) string {
	a, b := want.Lines(), got.Lines()
	if slices.Equal(a, b) {
		return ""
	}
	return Diff(want.Backend, got.Backend, a, b)
}

// CheckExpect verifies a (reference) record against the case's Expect and rejects
// trivial records.
func CheckExpect(c Case, r *Record) error {
	var errs []error
	if err := r.Trivial(); err != nil {
		errs = append(errs, err)
	}
	if l := r.Landing(); l != c.Expect {
		errs = append(errs, fmt.Errorf("landed on %q, case expects %q", l, c.Expect))
	}
	return errors.Join(errs...)
}
