package equiv

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
)

// The IPv6 half of the suite: every case of Cases that has an IPv6 meaning,
// over IPv6 (every address of the plan swapped for its IPv6 twin, every
// listener for an IPv6-only one), and the cases only IPv6 has. They run on the
// same dual-stack pods, under both rulesets.

// v6Of is the addressing plan's IPv6 twin of each IPv4 address.
var v6Of = map[string]string{
	"10.77.0.1":     "fd00:77::1",
	"10.77.0.2":     "fd00:77::2",
	"10.77.0.3":     "fd00:77::3",
	"10.77.0.50":    "fd00:77::50",
	"10.77.9.9":     "fd00:99::9",
	"10.78.0.1":     "fd00:78::1",
	"10.78.0.2":     "fd00:78::2",
	"169.254.7.127": "fd16:9254:7127:1337:ffff:ffff:ffff:ffff",
	"127.0.0.1":     "::1",
	"0.0.0.0":       "::",
}

// to6 translates an ip:port of the plan ("" stays "").
func to6(s string) string {
	if s == "" {
		return ""
	}
	ap := netip.MustParseAddrPort(s)
	v6, ok := v6Of[ap.Addr().String()]
	if !ok {
		panic("equiv: no IPv6 twin for " + s)
	}
	return netip.AddrPortFrom(netip.MustParseAddr(v6), ap.Port()).String()
}

func dial6(d standin.DialSpec) standin.DialSpec {
	d.Dst, d.Src = to6(d.Dst), to6(d.Src)
	return d
}

// listen6 is a listener's IPv6-only twin (same name: the addresses tell them apart).
func listen6(l standin.ListenSpec) standin.ListenSpec {
	l.Addr = to6(l.Addr)
	l.V6Only = true
	return l
}

// describe6 words a description with the plan's IPv6 addresses.
func describe6(d string) string {
	// Longest first: 10.77.0.1 must not rewrite the start of 10.77.0.10.
	keys := make([]string, 0, len(v6Of))
	for k := range v6Of {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int { return len(b) - len(a) })
	for _, k := range keys {
		d = strings.ReplaceAll(d, k, v6Of[k])
	}
	return d
}

// v6Name names a case's twin: out-x becomes out6-x (and 127.0.0.1 ::1).
func v6Name(name string) string {
	name = strings.ReplaceAll(name, "127.0.0.1", "::1")
	for _, p := range []string{"out-", "in-", "proxy-"} {
		if rest, ok := strings.CutPrefix(name, p); ok {
			return strings.TrimSuffix(p, "-") + "6-" + rest
		}
	}
	return name + "-6"
}

// twin6 is the IPv6 twin of a case.
func twin6(c Case) Case {
	t := c
	t.Name = v6Name(c.Name)
	t.Description = "IPv6: " + describe6(c.Description)
	t.Dial = dial6(c.Dial)
	if c.Meanwhile != nil {
		m := dial6(*c.Meanwhile)
		t.Meanwhile = &m
	}
	t.App, t.Peer = nil, nil
	for _, l := range c.App {
		t.App = append(t.App, listen6(l))
	}
	for _, l := range c.Peer {
		t.Peer = append(t.Peer, listen6(l))
	}
	return t
}

// noIPv6Meaning are the cases whose point is IPv4's own: the 127/8 range,
// IPv4-mapped addresses, an IPv4 client of a dual-stack listener.
var noIPv6Meaning = []string{
	"out-loopback-127.0.0.2", "out-v4-mapped-ipv6-socket", "out-io-uring-v4-mapped", "in-dual-stack-app",
}

// twinExpect are the landings of the twins that differ from their IPv4
// case's: what the reference does with IPv6.
var twinExpect = map[string]string{
	// Mark 0x111 is not redirected, and its policy route (local ::/0 dev lo
	// table 100) makes every destination local. IPv4 refuses the source then
	// (ENETUNREACH); IPv6 connects to R's address as a local one: nothing
	// listens there (refused), but the app's [::]:8080 does.
	"out6-mark-0x111-peer-80":   "refused",
	"out6-mark-0x111-peer-8080": "app:8080",
	// Bound to lo, an IPv6 destination not on lo is unreachable at once.
	"out6-bindtodevice-lo": "unreachable",
}

// Cases6 are the IPv6 twins of Cases and the cases only IPv6 has.
func Cases6() []Case {
	var out []Case
	for _, c := range Cases() {
		if slices.Contains(noIPv6Meaning, c.Name) {
			continue
		}
		t := twin6(c)
		if e, ok := twinExpect[t.Name]; ok {
			t.Expect = e
		}
		out = append(out, t)
	}
	return append(out, ipv6Only()...)
}

var (
	appServers6  = []standin.ListenSpec{listen6(tcp("0.0.0.0:8080")), listen6(tcp("127.0.0.1:9090")), listen6(udp("0.0.0.0:5353"))}
	peerServers6 = []standin.ListenSpec{listen6(tcp("0.0.0.0:80")), listen6(tcp("0.0.0.0:443")), listen6(tcp("0.0.0.0:8080")), listen6(udp("0.0.0.0:5353"))}
)

func outbound6(name, desc string, d standin.DialSpec, expect string) Case {
	return Case{Name: name, Description: desc, Proxy: allListeners, App: appServers6, Peer: peerServers6,
		Client: ClientApp, Dial: d, Expect: expect}
}

func inbound6(name, desc string, d standin.DialSpec, expect string) Case {
	return Case{Name: name, Description: desc, Proxy: allListeners, App: appServers6, Peer: peerServers6,
		Client: ClientPeer, Dial: d, Expect: expect}
}

// ipv6Only are the cases IPv4 has no twin for.
func ipv6Only() []Case {
	dualApp := []standin.ListenSpec{tcp("[::]:8080")}
	v4App := []standin.ListenSpec{tcp("0.0.0.0:8080"), listen6(tcp("127.0.0.1:9090"))}
	return []Case{
		outbound6("out6-own-link-local", "P→its own link-local address fe80::2%eth0 (routed through lo): not redirected",
			standin.DialSpec{Dst: "[fe80::2%eth0]:8080"}, "app:8080"),
		{Name: "out6-link-local-peer", Description: "P→R's link-local address fe80::1%eth0: redirected, but the socket is bound to eth0 by its scope, so the redirected SYN (to ::1) leaves through eth0 and R drops it: a time-out",
			Proxy: allListeners, App: appServers6, Peer: peerServers6, Client: ClientApp, Wire: true,
			Dial: standin.DialSpec{Dst: "[fe80::1%eth0]:80", TimeoutMS: 1000}, Expect: "timeout"},
		outbound("out-v4-mapped-own-address", "an AF_INET6 socket to ::ffff:10.77.0.2 (the pod's own, IPv4 on the wire): not redirected",
			standin.DialSpec{Dst: "[::ffff:10.77.0.2]:8080"}, "app:8080"),
		outbound("out-v4-mapped-probe", "an AF_INET6 socket to ::ffff:169.254.7.127: the IPv4 probe rule decides it",
			standin.DialSpec{Dst: "[::ffff:169.254.7.127]:80"}, "peer:80"),
		outbound("out-v4-mapped-loopback", "an AF_INET6 socket to ::ffff:127.0.0.1: IPv4's loopback, not redirected",
			standin.DialSpec{Dst: "[::ffff:127.0.0.1]:9090"}, "app:9090"),
		outbound6("out6-to-v4-only-listener", "P→[::1]:8080 where the only 8080 listener is... IPv6: the app's [::]:8080 (v6only)",
			standin.DialSpec{Dst: "[::1]:8080"}, "app:8080"),
		{Name: "in6-app-dual-stack", Description: "IPv6: the app listens on [::]:8080, dual-stack: R→[pod]:8080 through the proxy, the app sees R's IPv6 address",
			Proxy: allListeners, App: dualApp, Peer: peerServers6, Client: ClientPeer,
			Dial: standin.DialSpec{Dst: "[fd00:77::2]:8080"}, Expect: "proxy:15006>app:8080"},
		{Name: "in6-app-v4-only", Description: "IPv6: the app listens on 0.0.0.0:8080 only: R→[pod]:8080 reaches the proxy, whose IPv6 dial is refused",
			Proxy: allListeners, App: v4App, Peer: peerServers6, Client: ClientPeer,
			Dial: standin.DialSpec{Dst: "[fd00:77::2]:8080"}, Expect: "proxy:15006>dial-failed:refused"},
		inbound6("in6-link-local", "R→the pod's link-local address fe80::2%eth0:8080: redirected to the interface's link-local address:15006; the original destination has no scope, so the proxy's connect to it goes nowhere",
			standin.DialSpec{Dst: "[fe80::2%eth0]:8080"}, "proxy:15006>dial-failed:timeout"),
		{Name: "proxy-spoofed-client-on-subnet", Description: "the proxy connects to the app from a client address of the pod's own subnet that has no neighbour entry (as for an HBONE client): the app's replies must reach the proxy through the connection mark, with no neighbour lookup",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientProxy,
			Dial: standin.DialSpec{Dst: "10.77.0.2:8080", Src: "10.77.0.50:0", Transparent: true}, Expect: "app:8080"},
		{Name: "proxy6-spoofed-client-on-subnet", Description: "IPv6: the proxy connects to the app from a client address of the pod's own subnet that has no neighbour entry",
			Proxy: allListeners, App: appServers6, Peer: peerServers6, Client: ClientProxy,
			Dial: standin.DialSpec{Dst: "[fd00:77::2]:8080", Src: "[fd00:77::50]:0", Transparent: true}, Expect: "app:8080"},
		{Name: "proxy-spoofed-client-off-subnet", Description: "the proxy connects to the app from a client address behind the gateway: replies reach the proxy",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientProxy,
			Dial: standin.DialSpec{Dst: "10.77.0.2:8080", Src: "10.99.0.7:0", Transparent: true}, Expect: "app:8080"},
		{Name: "proxy6-spoofed-client-off-subnet", Description: "IPv6: the proxy connects to the app from a client address behind the gateway",
			Proxy: allListeners, App: appServers6, Peer: peerServers6, Client: ClientProxy,
			Dial: standin.DialSpec{Dst: "[fd00:77::2]:8080", Src: "[fd00:99::7]:0", Transparent: true}, Expect: "app:8080"},
	}
}
