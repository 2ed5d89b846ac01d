package equiv

import (
	"fmt"
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
)

// Clients of a case.
const (
	ClientApp   = standin.RoleApp   // inside the pod's cgroup
	ClientPeer  = standin.RolePeer  // R, outside the pod
	ClientProxy = standin.RoleProxy // the proxy itself, in its own cgroup
	// An application started in the pod's netns outside the pod's cgroup and
	// moved into the pod's cgroup once the backend is applied.
	ClientMovedApp = "moved-app"
	// The same, moved into a child cgroup of the pod's cgroup made after attach.
	ClientSubCgroupApp = "subcgroup-app"
	// A process in the pod's netns that stays outside the pod's cgroup (and
	// outside the proxy's): what `nsenter --net` into the pod gives.
	ClientNetnsApp = "netns-app"
)

// Case is one traffic scenario.
type Case struct {
	Name        string
	Description string
	// Setup: the proxy's listeners and the servers of the app and of R.
	Proxy standin.ProxySpec
	App   []standin.ListenSpec
	Peer  []standin.ListenSpec
	// The connection: who makes it and how. Dial.Token defaults to the case name.
	Client string
	Dial   standin.DialSpec
	// Expect is where the connection lands under the reference (see Record.Landing);
	// checking it under iptables proves the case exercises what it claims.
	Expect string

	// AttachLate starts the agents and their listeners before the backend is
	// applied (by default it is applied first): the client predates the capture.
	AttachLate bool
	// AddInterface gives the pod a second link (eth1, 10.78.0.2, R at 10.78.0.1)
	// after the backend is applied, as a CNI adding a network would.
	AddInterface bool
	// Reconcile tells the backend about the change afterwards (see Reconciler).
	Reconcile bool
	// RemoveWhileOpen removes the backend while the connection is open (after its
	// request line), lets it finish, then makes the same connection again.
	RemoveWhileOpen bool
	// Meanwhile is a second connection, by the same client, made while the first
	// is held open after its request line; the first finishes after it.
	Meanwhile *standin.DialSpec
	// Wire records the connection attempts (SYNs) crossing the pod's lo and R's
	// eth0: the evidence for a case in which no party accepts anything.
	Wire bool
	// Requires names a kernel facility the case needs ("io_uring", "mptcp"); where
	// it is missing the case is skipped with the reason (see Unavailable).
	Requires string
	// KnownDifference, when set, is why ebpf-redirect legitimately differs from the
	// reference here; EbpfExpect is then where the connection lands under
	// ebpf-redirect, which the suite checks instead of equality.
	KnownDifference string
	EbpfExpect      string
}

// Unavailable says why the case cannot run on this machine, or "".
func (c Case) Unavailable() string {
	switch c.Requires {
	case "":
		return ""
	case "io_uring":
		if err := standin.IOUringAvailable(); err != nil {
			return err.Error()
		}
		return ""
	case "mptcp":
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_MPTCP)
		if err != nil {
			return fmt.Sprintf("MPTCP unavailable: socket(IPPROTO_MPTCP): %v", err)
		}
		unix.Close(fd)
		return ""
	default:
		return fmt.Sprintf("unknown requirement %q", c.Requires)
	}
}

// FixedPorts are the ports that mean something in the case: the proxy's, every
// listener's, the dialled one and a bound source port. Every other port is ephemeral.
func (c Case) FixedPorts() map[uint16]bool {
	fixed := map[uint16]bool{standin.PortOutbound: true, standin.PortInbound: true, standin.PortHBONE: true}
	add := func(s string) {
		if ap, err := netip.ParseAddrPort(s); err == nil && ap.Port() != 0 {
			fixed[ap.Port()] = true
		}
	}
	for _, l := range append(slices.Clone(c.App), c.Peer...) {
		add(l.Addr)
	}
	add(c.Dial.Dst)
	add(c.Dial.Src)
	if c.Meanwhile != nil {
		add(c.Meanwhile.Dst)
		add(c.Meanwhile.Src)
	}
	return fixed
}

func (c Case) dialSpec() standin.DialSpec {
	d := c.Dial
	if d.Proto == "" {
		d.Proto = "tcp"
	}
	if d.Token == "" {
		d.Token = c.Name
	}
	return d
}

func tcp(addr string) standin.ListenSpec { return standin.ListenSpec{Proto: "tcp", Addr: addr} }
func udp(addr string) standin.ListenSpec { return standin.ListenSpec{Proto: "udp", Addr: addr} }

var (
	allListeners = standin.ProxySpec{Outbound: true, Inbound: true, HBONE: true}
	// The usual servers: several on each side, so that a connection landing on the
	// wrong one shows up, not just a connection that lands nowhere.
	appServers  = []standin.ListenSpec{tcp("0.0.0.0:8080"), tcp("127.0.0.1:9090"), udp("0.0.0.0:5353")}
	peerServers = []standin.ListenSpec{tcp("0.0.0.0:80"), tcp("0.0.0.0:443"), tcp("0.0.0.0:8080"), udp("0.0.0.0:5353")}
)

// FixedSrcPort is a client port bound on purpose, outside the ephemeral range.
const FixedSrcPort = "31337"

func outbound(name, desc string, d standin.DialSpec, expect string) Case {
	return Case{Name: name, Description: desc, Proxy: allListeners, App: appServers, Peer: peerServers,
		Client: ClientApp, Dial: d, Expect: expect}
}

func inbound(name, desc string, d standin.DialSpec, expect string) Case {
	return Case{Name: name, Description: desc, Proxy: allListeners, App: appServers, Peer: peerServers,
		Client: ClientPeer, Dial: d, Expect: expect}
}

const mib = 1 << 20

// Cases is the IPv4 suite, in the order it runs (Cases6 follows it).
func Cases() []Case {
	viaProxyToPeer80 := "proxy:15001>peer:80"
	viaProxyToApp := "proxy:15006>app:8080"
	cs := []Case{
		// Outbound: the app, in the pod's cgroup, connects out.
		outbound("out-peer-http", "P→R:80 is redirected to 15001; the proxy reads R:80 as original destination and relays R's answer",
			standin.DialSpec{Dst: "10.77.0.1:80"}, viaProxyToPeer80),
		outbound("out-remote-service", "P→10.77.9.9:443 (behind the gateway) is redirected",
			standin.DialSpec{Dst: "10.77.9.9:443"}, "proxy:15001>peer:443"),
		outbound("out-probe-address", "P→169.254.7.127 is not redirected",
			standin.DialSpec{Dst: "169.254.7.127:80"}, "peer:80"),
		outbound("out-loopback-127.0.0.1", "P→127.0.0.1 is not redirected",
			standin.DialSpec{Dst: "127.0.0.1:9090"}, "app:9090"),
		outbound("out-loopback-127.0.0.2", "P→127.0.0.2 (routed through lo) is not redirected",
			standin.DialSpec{Dst: "127.0.0.2:8080"}, "app:8080"),
		outbound("out-own-address", "P→its own pod address is not redirected",
			standin.DialSpec{Dst: "10.77.0.2:8080"}, "app:8080"),
		outbound("out-own-secondary-address", "P→its secondary address is not redirected",
			standin.DialSpec{Dst: "10.77.0.3:8080"}, "app:8080"),
		outbound("out-unspecified-address", "P→0.0.0.0 means loopback to the kernel: not redirected",
			standin.DialSpec{Dst: "0.0.0.0:8080"}, "app:8080"),
		outbound("out-own-address-closed-port", "P→own address, nothing listening: refused, not redirected",
			standin.DialSpec{Dst: "10.77.0.2:8081"}, "refused"),
		outbound("out-mark-0x539", "a socket carrying the proxy mark is not redirected",
			standin.DialSpec{Dst: "10.77.0.1:80", Mark: 0x539}, "peer:80"),
		outbound("out-mark-0x1539", "0x1539 has the proxy mark under mask 0xfff: not redirected",
			standin.DialSpec{Dst: "10.77.0.1:80", Mark: 0x1539}, "peer:80"),
		outbound("out-mark-0x53a", "0x53a is not the proxy mark: redirected",
			standin.DialSpec{Dst: "10.77.0.1:80", Mark: 0x53a}, viaProxyToPeer80),
		// Mark 0x111 is not redirected, and its policy route makes every destination
		// local. An unbound socket then fails at connect: the kernel picks the
		// destination itself as source (a local route), and the second route lookup
		// refuses a source no interface owns (ENETUNREACH). Nothing is sent.
		outbound("out-mark-0x111-peer-80", "mark 0x111 to R:80: not redirected; the policy route makes R local, connect fails with ENETUNREACH",
			standin.DialSpec{Dst: "10.77.0.1:80", Mark: 0x111}, "unreachable"),
		outbound("out-mark-0x111-peer-8080", "mark 0x111 to R:8080 (the app listens on 0.0.0.0:8080): the same ENETUNREACH, the app's listener is never reached",
			standin.DialSpec{Dst: "10.77.0.1:8080", Mark: 0x111}, "unreachable"),
		outbound("out-mark-0x111-own-address", "mark 0x111 to the pod's own address: not redirected, delivered locally through table 100",
			standin.DialSpec{Dst: "10.77.0.2:8080", Mark: 0x111}, "app:8080"),
		outbound("out-udp-peer", "UDP P→R is untouched",
			standin.DialSpec{Proto: "udp", Dst: "10.77.0.1:5353"}, "peer:5353/udp"),
		outbound("out-udp-peer-closed-port", "UDP P→R closed port: R's ICMP refusal reaches the app",
			standin.DialSpec{Proto: "udp", Dst: "10.77.0.1:5354"}, "refused"),
		outbound("out-self-call-15001", "P→127.0.0.1:15001 is not redirected; the proxy refuses the self call",
			standin.DialSpec{Dst: "127.0.0.1:15001"}, "proxy:15001>self-call-refused"),
		outbound("out-self-call-15006", "P→127.0.0.1:15006 reaches the inbound listener, which refuses the self call",
			standin.DialSpec{Dst: "127.0.0.1:15006"}, "proxy:15006>self-call-refused"),
		outbound("out-peer-closed-port", "P→R port without server: the proxy accepts, its dial is refused, the app sees a close",
			standin.DialSpec{Dst: "10.77.0.1:81"}, "proxy:15001>dial-failed:refused"),
		outbound("out-unreachable-host", "P→an address nobody answers for: the proxy accepts, its dial times out",
			standin.DialSpec{Dst: "10.77.0.50:80", TimeoutMS: 4000}, "proxy:15001>dial-failed:timeout"),
		outbound("out-bound-pod-ip-port-0", "the app binds 10.77.0.2:0 before connecting: still redirected",
			standin.DialSpec{Dst: "10.77.0.1:80", Src: "10.77.0.2:0"}, viaProxyToPeer80),
		outbound("out-bound-fixed-port", "the app binds 10.77.0.2:"+FixedSrcPort+": the proxy sees that port",
			standin.DialSpec{Dst: "10.77.0.1:80", Src: "10.77.0.2:" + FixedSrcPort}, viaProxyToPeer80),
		outbound("out-bound-secondary-ip", "the app binds its secondary address: the proxy sees it as the client",
			standin.DialSpec{Dst: "10.77.0.1:80", Src: "10.77.0.3:0"}, viaProxyToPeer80),
		outbound("out-v4-mapped-ipv6-socket", "an AF_INET6 socket connecting to ::ffff:10.77.0.1 is redirected too",
			standin.DialSpec{Dst: "[::ffff:10.77.0.1]:80"}, viaProxyToPeer80),

		// Bypass attempts: other ways for an unprivileged application to connect.
		outbound("out-nonblocking-connect", "a non-blocking connect() polled to completion (how every case dials by default) is redirected",
			standin.DialSpec{Dst: "10.77.0.1:8080", Method: standin.MethodNonblocking}, "proxy:15001>peer:8080"),
		outbound("out-blocking-connect", "a blocking connect() is redirected",
			standin.DialSpec{Dst: "10.77.0.1:80", Method: standin.MethodBlocking}, viaProxyToPeer80),
		outbound("out-tfo-sendto", "TCP Fast Open: sendto(MSG_FASTOPEN) with the request, no connect() call: redirected",
			standin.DialSpec{Dst: "10.77.0.1:80", Method: standin.MethodTFOSendto}, viaProxyToPeer80),
		outbound("out-tfo-connect", "TCP Fast Open: TCP_FASTOPEN_CONNECT, connect() returns before the SYN, the first write sends it: redirected",
			standin.DialSpec{Dst: "10.77.0.1:80", Method: standin.MethodTFOConnect}, viaProxyToPeer80),
		{Name: "out-io-uring-connect", Description: "IORING_OP_CONNECT, no connect(2) call: redirected",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientApp, Requires: "io_uring",
			Dial: standin.DialSpec{Dst: "10.77.0.1:80", Method: standin.MethodIOUring}, Expect: viaProxyToPeer80},
		{Name: "out-io-uring-v4-mapped", Description: "IORING_OP_CONNECT on an AF_INET6 socket to ::ffff:10.77.0.1: redirected",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientApp, Requires: "io_uring",
			Dial: standin.DialSpec{Dst: "[::ffff:10.77.0.1]:80", Method: standin.MethodIOUring}, Expect: viaProxyToPeer80},
		{Name: "out-mptcp", Description: "an MPTCP socket (IPPROTO_MPTCP) is redirected; the proxy, not MPTCP-capable, gets plain TCP",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientApp, Requires: "mptcp",
			Dial: standin.DialSpec{Dst: "10.77.0.1:80", MPTCP: true}, Expect: viaProxyToPeer80},
		{Name: "out-bindtodevice-eth0", Description: "SO_BINDTODEVICE to the pod's interface: redirected, but the redirected SYN (to 127.0.0.1:15001) must leave through eth0 and R drops it; nothing reaches R:80",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientApp, Wire: true,
			Dial: standin.DialSpec{Dst: "10.77.0.1:80", Device: "eth0", TimeoutMS: 1000}, Expect: "timeout"},
		{Name: "out-bindtodevice-lo", Description: "SO_BINDTODEVICE to lo: routed through lo, so not redirected (rule 3); the SYN to R loops back and is dropped",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientApp, Wire: true,
			Dial: standin.DialSpec{Dst: "10.77.0.1:80", Device: "lo", TimeoutMS: 1000}, Expect: "timeout"},
		outbound("out-bindtodevice-eth0-own-address", "SO_BINDTODEVICE to eth0, then connect to the pod's own address: local, not redirected",
			standin.DialSpec{Dst: "10.77.0.2:8080", Device: "eth0"}, "app:8080"),
		{Name: "out-started-before-attach", Description: "the app process (and its listeners) existed before the capture was applied: its new connection is redirected",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientApp, AttachLate: true,
			Dial: standin.DialSpec{Dst: "10.77.0.1:80"}, Expect: viaProxyToPeer80},
		{Name: "out-new-thread", Description: "from an OS thread created after the capture was applied, in a process that predates it: redirected",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientApp, AttachLate: true,
			Dial: standin.DialSpec{Dst: "10.77.0.1:80", From: standin.FromThread}, Expect: viaProxyToPeer80},
		{Name: "out-forked-child", Description: "from a child process forked after the capture was applied: redirected",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientApp, AttachLate: true,
			Dial: standin.DialSpec{Dst: "10.77.0.1:80", From: standin.FromChild}, Expect: viaProxyToPeer80},
		{Name: "out-moved-into-pod-cgroup", Description: "a process of the pod's netns moved into the pod's cgroup after attach: redirected",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientMovedApp,
			Dial: standin.DialSpec{Dst: "10.77.0.1:80"}, Expect: viaProxyToPeer80},
		{Name: "out-moved-into-pod-subcgroup", Description: "a process moved into a child cgroup of the pod's, made after attach: redirected (cgroup programs apply to descendants)",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientSubCgroupApp,
			Dial: standin.DialSpec{Dst: "10.77.0.1:80"}, Expect: viaProxyToPeer80},
		{Name: "out-netns-outside-cgroup", Description: "a process in the pod's netns but outside the pod's cgroup (nsenter --net)",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientNetnsApp,
			Dial: standin.DialSpec{Dst: "10.77.0.1:80"}, Expect: viaProxyToPeer80,
			KnownDifference: "capture follows the pod's cgroup, not its netns: a process that entered the netns from outside (needs CAP_SYS_ADMIN on the node) is not the pod's application and is not captured outbound",
			EbpfExpect:      "peer:80"},
		outbound("out-pod-ip-15006", "P→its own address:15006 (routed through lo: not redirected) reaches the inbound listener, which refuses the self call",
			standin.DialSpec{Dst: "10.77.0.2:15006"}, "proxy:15006>self-call-refused"),
		{Name: "out-peer-port-15008", Description: "P→R:15008 is redirected (the 15008 exemption is inbound only)",
			Proxy: allListeners, App: appServers, Peer: append(slices.Clone(peerServers), tcp("0.0.0.0:15008")),
			Client: ClientApp, Dial: standin.DialSpec{Dst: "10.77.0.1:15008"}, Expect: "proxy:15001>peer:15008"},
		outbound("out-payload-1mib", "1 MiB each way through the outbound proxy, intact",
			standin.DialSpec{Dst: "10.77.0.1:80", Size: mib}, viaProxyToPeer80),
		{Name: "out-no-outbound-listener", Description: "no proxy on 15001: refused, R never sees it (fails closed)",
			Proxy: standin.ProxySpec{Inbound: true, HBONE: true}, App: appServers, Peer: peerServers,
			Client: ClientApp, Dial: standin.DialSpec{Dst: "10.77.0.1:80"}, Expect: "refused"},
		{Name: "proxy-dials-peer", Description: "the proxy's own marked connection is not redirected; R sees the pod address",
			Proxy: allListeners, App: appServers, Peer: peerServers,
			Client: ClientProxy, Dial: standin.DialSpec{Dst: "10.77.0.1:80"}, Expect: "peer:80"},
		{Name: "proxy-dials-own-address", Description: "the proxy's marked connection to the pod address reaches the app directly",
			Proxy: allListeners, App: appServers, Peer: peerServers,
			Client: ClientProxy, Dial: standin.DialSpec{Dst: "10.77.0.2:8080"}, Expect: "app:8080"},

		// Inbound: R connects to the pod.
		inbound("in-app-port", "R→P:8080 is redirected to 15006; the proxy delivers with R's address as source; R gets the app's answer",
			standin.DialSpec{Dst: "10.77.0.2:8080"}, viaProxyToApp),
		inbound("in-secondary-address", "R→P's secondary address:8080 is redirected too",
			standin.DialSpec{Dst: "10.77.0.3:8080"}, viaProxyToApp),
		inbound("in-hbone", "R→P:15008 reaches the HBONE listener directly",
			standin.DialSpec{Dst: "10.77.0.2:15008"}, "proxy:15008"),
		inbound("in-hbone-secondary-address", "R→P's secondary address:15008 reaches the HBONE listener directly",
			standin.DialSpec{Dst: "10.77.0.3:15008"}, "proxy:15008"),
		{Name: "in-no-hbone-listener", Description: "no proxy on 15008: R→P:15008 is refused",
			Proxy: standin.ProxySpec{Outbound: true, Inbound: true}, App: appServers, Peer: peerServers,
			Client: ClientPeer, Dial: standin.DialSpec{Dst: "10.77.0.2:15008"}, Expect: "refused"},
		inbound("in-probe-source", "R from 169.254.7.127→P:8080 reaches the app directly",
			standin.DialSpec{Dst: "10.77.0.2:8080", Src: "169.254.7.127:0"}, "app:8080"),
		inbound("in-probe-source-closed-port", "R from 169.254.7.127→P closed port: refused by the pod itself",
			standin.DialSpec{Dst: "10.77.0.2:8081", Src: "169.254.7.127:0"}, "refused"),
		inbound("in-closed-port", "R→P closed port: the proxy accepts, its dial is refused, R sees a close",
			standin.DialSpec{Dst: "10.77.0.2:8081"}, "proxy:15006>dial-failed:refused"),
		{Name: "in-no-inbound-listener", Description: "no proxy on 15006: refused, the app never sees it (fails closed)",
			Proxy: standin.ProxySpec{Outbound: true, HBONE: true}, App: appServers, Peer: peerServers,
			Client: ClientPeer, Dial: standin.DialSpec{Dst: "10.77.0.2:8080"}, Expect: "refused"},
		inbound("in-udp", "UDP R→P:5353 is untouched; the app sees R",
			standin.DialSpec{Proto: "udp", Dst: "10.77.0.2:5353"}, "app:5353/udp"),
		inbound("in-app-loopback-only", "R→P:9090 where the app listens on 127.0.0.1 only: the proxy's dial is refused",
			standin.DialSpec{Dst: "10.77.0.2:9090"}, "proxy:15006>dial-failed:refused"),
		inbound("in-payload-1mib", "1 MiB each way through the inbound proxy, intact",
			standin.DialSpec{Dst: "10.77.0.2:8080", Size: mib}, viaProxyToApp),
		inbound("in-peer-mark-0x539", "R's socket mark does not cross the veth: still redirected",
			standin.DialSpec{Dst: "10.77.0.2:8080", Mark: 0x539}, viaProxyToApp),
		inbound("in-bound-fixed-port", "R connects from port "+FixedSrcPort+": the proxy sees it",
			standin.DialSpec{Dst: "10.77.0.2:8080", Src: "10.77.0.1:" + FixedSrcPort}, viaProxyToApp),
		{Name: "in-dual-stack-app", Description: "the app listens on [::]:8080 (dual-stack): it sees R as ::ffff:10.77.0.1",
			Proxy: allListeners, App: []standin.ListenSpec{tcp("[::]:8080")}, Peer: peerServers,
			Client: ClientPeer, Dial: standin.DialSpec{Dst: "10.77.0.2:8080"}, Expect: viaProxyToApp},
		{Name: "in-same-source-port-two-ports", Description: "R connects from one port to P:8080 and, while that is open, from the same port to P:8082: after REDIRECT both are R:31337→P:15006; the first must live on",
			Proxy: allListeners, App: append(slices.Clone(appServers), tcp("0.0.0.0:8082")), Peer: peerServers, Client: ClientPeer,
			Dial:      standin.DialSpec{Dst: "10.77.0.2:8080", Src: "10.77.0.1:" + FixedSrcPort, ReuseAddr: true, Size: 1000},
			Meanwhile: &standin.DialSpec{Dst: "10.77.0.2:8082", Src: "10.77.0.1:" + FixedSrcPort, ReuseAddr: true, TimeoutMS: 1500},
			Expect:    "proxy:15006>app:8080"},
		{Name: "in-same-source-port-then-hbone", Description: "R connects from one port to P:8080 and, while that is open, from the same port to P:15008 (not redirected): both live",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientPeer,
			Dial:      standin.DialSpec{Dst: "10.77.0.2:8080", Src: "10.77.0.1:" + FixedSrcPort, ReuseAddr: true, Size: 1000},
			Meanwhile: &standin.DialSpec{Dst: "10.77.0.2:15008", Src: "10.77.0.1:" + FixedSrcPort, ReuseAddr: true},
			Expect:    "proxy:15006>app:8080,proxy:15008"},
		inbound("in-pod-ip-15006", "R→P:15006 is redirected to 15006 itself; the proxy refuses the self call",
			standin.DialSpec{Dst: "10.77.0.2:15006"}, "proxy:15006>self-call-refused"),
		inbound("in-pod-ip-15001", "R→P:15001 is redirected to 15006; the proxy refuses the self call",
			standin.DialSpec{Dst: "10.77.0.2:15001"}, "proxy:15006>self-call-refused"),
		{Name: "in-second-interface-after-attach", Description: "R→P's address on a link added after attach (eth1, 10.78.0.2:8080)",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientPeer, AddInterface: true,
			Dial: standin.DialSpec{Dst: "10.78.0.2:8080", TimeoutMS: 1000}, Expect: viaProxyToApp,
			KnownDifference: "the tc programs are on the links present at attach (or at the last reconcile); until the next reconcile, a new connection arriving on a later link is refused (dropped: the client times out) by the pod cgroup's ingress guard instead of being redirected",
			EbpfExpect:      "timeout"},
		{Name: "in-second-interface-after-reconcile", Description: "R→P's address on a link added after attach, once ebpf-redirect reconciled the pod: redirected",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientPeer, AddInterface: true, Reconcile: true,
			Dial: standin.DialSpec{Dst: "10.78.0.2:8080"}, Expect: viaProxyToApp},
		{Name: "in-second-interface-hbone", Description: "R→P:15008 on a link added after attach reaches the HBONE listener directly",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientPeer, AddInterface: true,
			Dial: standin.DialSpec{Dst: "10.78.0.2:15008"}, Expect: "proxy:15008"},
		{Name: "in-detach-while-open", Description: "the capture is removed while a redirected inbound connection is open: it breaks (its rewrite, or the route of the app's replies, is gone) and R sees a reset; the next connection reaches the app directly",
			Proxy: allListeners, App: appServers, Peer: peerServers, Client: ClientPeer, RemoveWhileOpen: true,
			Dial: standin.DialSpec{Dst: "10.77.0.2:8080", Size: 1000}, Expect: "app:8080"},
	}
	return cs
}

// AllCases are the IPv4 cases and their IPv6 twins and companions.
func AllCases() []Case { return append(Cases(), Cases6()...) }

// CaseByName finds a case of the suite.
func CaseByName(name string) (Case, bool) {
	for _, c := range AllCases() {
		if c.Name == name {
			return c, true
		}
	}
	return Case{}, false
}
