package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
)

// proxySpec configures the bench proxy: a lean stand-in for the node's proxy. It
// listens as the real one does ([::]:15001 and [::]:15006, SO_REUSEPORT, SO_MARK
// 0x539), learns the original destination with SO_ORIGINAL_DST, connects upstream
// marked 0x539 (inbound: from the client's own address, IP_TRANSPARENT) and relays.
type proxySpec struct {
	// Upstreams used when SO_ORIGINAL_DST has no answer: the "none" backend, where
	// the client connects to the proxy's listener itself.
	OutboundFallback  string `json:"outbound_fallback"`
	InboundFallback   string `json:"inbound_fallback"`
	OutboundFallback6 string `json:"outbound_fallback6"` // for IPv6 clients
	InboundFallback6  string `json:"inbound_fallback6"`
	// Transparent makes inbound upstream connections use the client's address as
	// source, as the real proxy does; the replies then need the capture's return path
	// (0x111), so "none" turns it off.
	Transparent bool `json:"transparent"`
}

// ProxyStats count the connections the proxy accepted since it started.
type ProxyStats struct {
	Accepted   int64 `json:"accepted"`
	OrigDst    int64 `json:"orig_dst"` // SO_ORIGINAL_DST answered: the connection was captured
	Fallback   int64 `json:"fallback"` // no answer: relayed to the configured upstream
	DialFailed int64 `json:"dial_failed"`
	InFlight   int64 `json:"in_flight"`
}

type proxy struct {
	spec      proxySpec
	fallback  map[int]string
	fallback6 map[int]string
	log       *slog.Logger
	lns       []net.Listener

	accepted, origDst, fallbackN, dialFailed, inFlight atomic.Int64
}

func markControl(transparent bool) func(string, string, syscall.RawConn) error {
	return func(network, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			s := int(fd)
			if serr = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_MARK, standin.ProxyMark); serr != nil {
				return
			}
			if transparent {
				level, opt, free := unix.SOL_IP, unix.IP_TRANSPARENT, unix.IP_FREEBIND
				if network == "tcp6" {
					level, opt, free = unix.SOL_IPV6, unix.IPV6_TRANSPARENT, unix.IPV6_FREEBIND
				}
				if serr = unix.SetsockoptInt(s, level, opt, 1); serr != nil {
					return
				}
				if serr = unix.SetsockoptInt(s, level, free, 1); serr != nil {
					return
				}
				// The port is picked at connect, against the full 4-tuple, so the
				// spoofed source does not run out of ports at high connection rates.
				serr = unix.SetsockoptInt(s, unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

func startProxy(spec proxySpec, log *slog.Logger) (*proxy, error) {
	p := &proxy{spec: spec, log: log, fallback: map[int]string{
		standin.PortOutbound: spec.OutboundFallback,
		standin.PortInbound:  spec.InboundFallback,
	}, fallback6: map[int]string{
		standin.PortOutbound: spec.OutboundFallback6,
		standin.PortInbound:  spec.InboundFallback6,
	}}
	for _, port := range []int{standin.PortOutbound, standin.PortInbound} {
		ln, err := standin.ProxyListen(context.Background(), fmt.Sprintf("[::]:%d", port))
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("proxy listen %d: %w", port, err)
		}
		p.lns = append(p.lns, ln)
		go p.acceptLoop(ln.(*net.TCPListener), port)
	}
	return p, nil
}

func (p *proxy) Close() error {
	for _, ln := range p.lns {
		ln.Close()
	}
	return nil
}

func (p *proxy) stats() ProxyStats {
	return ProxyStats{
		Accepted: p.accepted.Load(), OrigDst: p.origDst.Load(), Fallback: p.fallbackN.Load(),
		DialFailed: p.dialFailed.Load(), InFlight: p.inFlight.Load(),
	}
}

func (p *proxy) acceptLoop(ln *net.TCPListener, port int) {
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		p.accepted.Add(1)
		p.inFlight.Add(1)
		go func() {
			defer p.inFlight.Add(-1)
			p.handle(c, port)
		}()
	}
}

func (p *proxy) handle(c *net.TCPConn, port int) {
	defer c.Close()
	dst, ok := originalDst(c)
	if ok && dst.Addr().IsLoopback() && (dst.Port() == standin.PortOutbound || dst.Port() == standin.PortInbound) {
		ok = false // not redirected: the client dialled the listener itself
	}
	var target string
	if ok {
		p.origDst.Add(1)
		target = dst.String()
	} else {
		p.fallbackN.Add(1)
		target = p.fallback[port]
		if l := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr(); l.Is6() && !l.Is4In6() {
			target = p.fallback6[port]
		}
	}
	d := net.Dialer{Timeout: 3 * time.Second}
	transparent := port == standin.PortInbound && p.spec.Transparent
	if transparent {
		peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		d.LocalAddr = &net.TCPAddr{IP: peer.AsSlice()}
	}
	d.Control = markControl(transparent)
	up, err := d.Dial("tcp", target)
	if err != nil {
		p.dialFailed.Add(1)
		return
	}
	defer up.Close()
	relay(c, up.(*net.TCPConn))
}

// relay copies both ways with plain reads and writes (no splice: the same cost for
// every message size), passing each half-close on, until both directions end.
func relay(a, b *net.TCPConn) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		copyHalf(b, a)
	}()
	copyHalf(a, b)
	wg.Wait()
}

func copyHalf(dst, src *net.TCPConn) {
	bp := bufPool.Get().(*[]byte)
	_, _ = io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, *bp)
	bufPool.Put(bp)
	_ = dst.CloseWrite()
}

// originalDst asks SO_ORIGINAL_DST of an accepted connection.
func originalDst(c *net.TCPConn) (netip.AddrPort, bool) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, false
	}
	var dst netip.AddrPort
	_ = rc.Control(func(fd uintptr) {
		// As the real proxy: the IPv4 option, then the IPv6 one.
		if dst, err = standin.OriginalDst(int(fd)); err != nil {
			dst, err = standin.OriginalDst6(int(fd))
		}
	})
	return netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port()), err == nil && dst.IsValid()
}
