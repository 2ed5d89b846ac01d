package standin

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// proxyListenConfig makes the proxy's listeners as the real one does: dual-stack,
// plain TCP (Go would otherwise make them MPTCP, whose sockets do not answer
// SO_ORIGINAL_DST), SO_REUSEPORT, best-effort IP(V6)_TRANSPARENT, SO_MARK 0x539.
var proxyListenConfig = func() net.ListenConfig {
	lc := proxyListenControl
	lc.SetMultipathTCP(false)
	return lc
}()

var proxyListenControl = net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		s := int(fd)
		if serr = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); serr != nil {
			return
		}
		_ = unix.SetsockoptInt(s, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
		_ = unix.SetsockoptInt(s, unix.SOL_IP, unix.IP_TRANSPARENT, 1)
		serr = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_MARK, ProxyMark)
	})
	if err != nil {
		return err
	}
	return serr
}}

// startProxy opens the requested listeners; it fails if any of them cannot be opened.
func (a *agent) startProxy(spec ProxySpec) error {
	timeout := time.Duration(spec.DialTimeoutMS) * time.Millisecond
	if timeout <= 0 {
		timeout = 1500 * time.Millisecond
	}
	for _, l := range []struct {
		on   bool
		port int
	}{{spec.Outbound, PortOutbound}, {spec.Inbound, PortInbound}, {spec.HBONE, PortHBONE}} {
		if !l.on {
			continue
		}
		ln, err := proxyListenConfig.Listen(context.Background(), "tcp", fmt.Sprintf("[::]:%d", l.port))
		if err != nil {
			return fmt.Errorf("proxy listen %d: %w", l.port, err)
		}
		a.keep(ln)
		port := l.port
		go a.acceptLoop(ln.(*net.TCPListener), func(c *net.TCPConn) { a.proxyConn(c, port, timeout, spec.Quiet) })
	}
	return nil
}

// isSelfCall: an original destination that is one of the proxy's own ports.
// Outbound (15001) refuses it on a loopback address (the reference README);
// inbound plaintext (15006) on any address, as the real proxy does, since
// relaying pod:15006 to pod:15006 would loop forever.
func isSelfCall(listener int, dst netip.AddrPort) bool {
	switch dst.Port() {
	case PortOutbound, PortInbound, PortHBONE:
		return listener == PortInbound || dst.Addr().Unmap().IsLoopback()
	}
	return false
}

// proxyConn handles one accepted connection and records what the proxy saw.
func (a *agent) proxyConn(c *net.TCPConn, port int, dialTimeout time.Duration, quiet bool) {
	defer c.Close()
	ev := ProxyEvent{Listener: port}
	record := a.addProxyEvent
	if quiet {
		record = func(e ProxyEvent) { a.count(fmt.Sprintf("%s:%d:%s", RoleProxy, e.Listener, e.Action)) }
	}
	var orig, peer netip.AddrPort
	_ = withFD(c, func(fd int) {
		ev.Local, ev.Peer = names(fd)
		if sa, err := unix.Getpeername(fd); err == nil {
			peer = addrPortOf(sa)
		}
		if port != PortHBONE {
			// As the real proxy: the IPv4 option, then the IPv6 one. Both are
			// asked and recorded, so that what each family's option answers
			// is compared, not only the first that does.
			dst4, n4, err4 := originalDst(fd)
			dst6, n6, err6 := originalDst6(fd)
			ev.OrigDstAnswers = fmt.Sprintf("ip=%s ipv6=%s", answer(dst4, n4, err4), answer(dst6, n6, err6))
			switch {
			case err4 == nil:
				orig, ev.OrigDstFrom = dst4, fmt.Sprintf("%s/len=%d", OrigDstFromCT, n4)
			case err6 == nil:
				orig, ev.OrigDstFrom = dst6, fmt.Sprintf("%s/len=%d", OrigDstFromCT6, n6)
			}
		}
		if !orig.IsValid() {
			if sa, err := unix.Getsockname(fd); err == nil {
				orig, ev.OrigDstFrom = addrPortOf(sa), OrigDstFromLocal
			}
		}
	})
	orig = netip.AddrPortFrom(orig.Addr().Unmap(), orig.Port())
	ev.OrigDst = orig.String()

	if isSelfCall(port, orig) {
		ev.Action = ActionSelfCall
		record(ev)
		closeGracefully(c)
		return
	}
	if port == PortHBONE {
		name := fmt.Sprintf("%s:%d", RoleProxy, PortHBONE)
		req, reply := readRequest(c, name, 10*time.Second)
		ev.Action, ev.Request = ActionServed, req
		record(ev)
		if reply != nil {
			_ = reply()
		}
		return
	}

	opts := connectOpts{sotype: unix.SOCK_STREAM, dst: orig, mark: ProxyMark, timeout: dialTimeout}
	if port == PortInbound {
		// Deliver with the original client's address as source, as the real proxy does.
		opts.transparent = true
		opts.src = netip.AddrPortFrom(peer.Addr().Unmap(), 0)
	}
	up, upLocal, upPeer, err := rawConnect(opts)
	if err != nil {
		ev.Action = ActionDialFailed + classify(err)
		record(ev)
		closeGracefully(c)
		return
	}
	defer up.Close()
	ev.Action, ev.UpLocal, ev.UpPeer = ActionRelayed, upLocal, upPeer
	ev.BytesUp, ev.BytesDown = relay(c, up.(*net.TCPConn))
	record(ev)
}

// answer words one original-destination option's answer: the address, or that
// it failed (which errno does not matter: it depends on whether nf_conntrack is
// loaded at all).
func answer(dst netip.AddrPort, n int, err error) string {
	if err != nil {
		return "failed"
	}
	return fmt.Sprintf("%s/len=%d", dst, n)
}

// closeGracefully sends FIN and drains until the client closes too (bounded), so that
// the client deterministically reads end-of-file rather than racing a reset against
// the data it had already sent.
func closeGracefully(c *net.TCPConn) {
	_ = c.CloseWrite()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.Copy(io.Discard, c)
}

// relay copies both ways, propagating half-closes, until both directions are done.
func relay(client, up *net.TCPConn) (upBytes, downBytes int64) {
	deadline := time.Now().Add(30 * time.Second)
	_ = client.SetDeadline(deadline)
	_ = up.SetDeadline(deadline)
	var wg sync.WaitGroup
	wg.Add(2)
	// Copy through a buffer: io.Copy between two TCP connections splices
	// through a pipe per direction, four more descriptors per connection, which
	// a load test's proxy cannot afford (nor does the real proxy do it).
	go func() {
		defer wg.Done()
		upBytes, _ = io.CopyBuffer(struct{ io.Writer }{up}, struct{ io.Reader }{client}, make([]byte, 32<<10))
		_ = up.CloseWrite()
	}()
	go func() {
		defer wg.Done()
		downBytes, _ = io.CopyBuffer(struct{ io.Writer }{client}, struct{ io.Reader }{up}, make([]byte, 32<<10))
		_ = client.CloseWrite()
	}()
	wg.Wait()
	return upBytes, downBytes
}

// ProxyListen opens a listener the way the stand-in proxy does (dual-stack "[::]:port",
// SO_REUSEPORT, best-effort IP(V6)_TRANSPARENT, SO_MARK 0x539), for other harnesses'
// proxies.
func ProxyListen(ctx context.Context, addr string) (net.Listener, error) {
	return proxyListenConfig.Listen(ctx, "tcp", addr)
}
