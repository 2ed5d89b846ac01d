package standin

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// soOriginalDst is SO_ORIGINAL_DST from linux/netfilter_ipv4.h.
const soOriginalDst = 80

// soOriginalDst6 is IP6T_SO_ORIGINAL_DST from linux/netfilter_ipv6/ip6_tables.h.
const soOriginalDst6 = 80

// fmtSockaddr prints a socket address as the kernel gave it: an AF_INET6 socket's
// v4-mapped address stays "[::ffff:a.b.c.d]:p", so a change of family is visible,
// and a scoped (link-local) one shows its interface ("[fe80::1%eth0]:p").
func fmtSockaddr(sa unix.Sockaddr) string {
	switch sa.(type) {
	case *unix.SockaddrInet4, *unix.SockaddrInet6:
		return addrPortOf(sa).String()
	case nil:
		return ""
	default:
		return fmt.Sprintf("%T", sa)
	}
}

func addrPortOf(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		ip := netip.AddrFrom16(a.Addr)
		if a.ZoneId != 0 {
			ip = ip.WithZone(zoneName(a.ZoneId))
		}
		return netip.AddrPortFrom(ip, uint16(a.Port))
	}
	return netip.AddrPort{}
}

// zoneName names an interface of the calling process's namespace.
func zoneName(index uint32) string {
	if ifc, err := net.InterfaceByIndex(int(index)); err == nil {
		return ifc.Name
	}
	return fmt.Sprint(index)
}

// sockaddrFor builds a sockaddr of the given family; an IPv4 address in an AF_INET6
// socket becomes v4-mapped, and a zone ("%eth0") the scope id.
func sockaddrFor(family int, ap netip.AddrPort) unix.Sockaddr {
	if family == unix.AF_INET {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}
	}
	sa := &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	if z := ap.Addr().Zone(); z != "" {
		if ifc, err := net.InterfaceByName(z); err == nil {
			sa.ZoneId = uint32(ifc.Index)
		}
	}
	return sa
}

// names reads getsockname and getpeername of a socket.
func names(fd int) (local, peer string) {
	if sa, err := unix.Getsockname(fd); err == nil {
		local = fmtSockaddr(sa)
	}
	if sa, err := unix.Getpeername(fd); err == nil {
		peer = fmtSockaddr(sa)
	}
	return local, peer
}

// withFD runs f on the raw descriptor of a net.Conn or net.Listener.
func withFD(c syscall.Conn, f func(fd int)) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Control(func(fd uintptr) { f(int(fd)) })
}

// connectOpts describes one outgoing socket.
type connectOpts struct {
	sotype      int // SOCK_STREAM | SOCK_DGRAM
	dst         netip.AddrPort
	src         netip.AddrPort // bound before connect when valid
	mark        uint32
	transparent bool // IP_TRANSPARENT + IP_FREEBIND (the proxy's spoofed source)
	timeout     time.Duration
	method      string // DialSpec.Method
	device      string // SO_BINDTODEVICE
	reuseAddr   bool   // SO_REUSEADDR
	mptcp       bool   // IPPROTO_MPTCP
	first       []byte // TFO methods: sent with (tfo-sendto) or right after (tfo-connect) the connect
}

// blockingMethod: the socket is created blocking, its connect bounded by
// SO_SNDTIMEO (or io_uring's own timeout).
func blockingMethod(m string) bool {
	return m == MethodBlocking || m == MethodTFOSendto || m == MethodTFOConnect || m == MethodIOUring
}

// rawConnect creates, configures, binds and connects a socket with plain syscalls, so
// that exactly what the kernel is asked (family, address, marks) is under control, and
// returns it as a net.Conn with its names read right after connect.
func rawConnect(o connectOpts) (c net.Conn, local, peer string, err error) {
	family := unix.AF_INET
	if o.dst.Addr().Is6() {
		family = unix.AF_INET6
	}
	flags := unix.SOCK_CLOEXEC
	if !blockingMethod(o.method) {
		flags |= unix.SOCK_NONBLOCK
	}
	proto := 0
	if o.mptcp {
		proto = unix.IPPROTO_MPTCP
	}
	fd, err := unix.Socket(family, o.sotype|flags, proto)
	if err != nil {
		return nil, "", "", fmt.Errorf("socket: %w", err)
	}
	closeFD := true
	defer func() {
		if closeFD {
			unix.Close(fd)
		}
	}()
	if o.mark != 0 {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(o.mark)); err != nil {
			return nil, "", "", fmt.Errorf("SO_MARK: %w", err)
		}
	}
	if o.transparent {
		// The real proxy: IP_TRANSPARENT + IP_FREEBIND, IPV6_TRANSPARENT +
		// IPV6_FREEBIND for IPv6.
		level, opt, free := unix.SOL_IP, unix.IP_TRANSPARENT, unix.IP_FREEBIND
		if family == unix.AF_INET6 {
			level, opt, free = unix.SOL_IPV6, unix.IPV6_TRANSPARENT, unix.IPV6_FREEBIND
		}
		if err := unix.SetsockoptInt(fd, level, opt, 1); err != nil {
			return nil, "", "", fmt.Errorf("IP(V6)_TRANSPARENT: %w", err)
		}
		if err := unix.SetsockoptInt(fd, level, free, 1); err != nil {
			return nil, "", "", fmt.Errorf("IP(V6)_FREEBIND: %w", err)
		}
		// Pick the port at connect, knowing the destination, as a proxy under
		// load must: a port picked at bind cannot be shared with a connection
		// in TIME_WAIT, and a burst of short connections runs out of ports.
		if o.src.Port() == 0 {
			if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1); err != nil {
				return nil, "", "", fmt.Errorf("IP_BIND_ADDRESS_NO_PORT: %w", err)
			}
		}
	}
	if o.device != "" {
		if err := unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, o.device); err != nil {
			return nil, "", "", fmt.Errorf("SO_BINDTODEVICE %s: %w", o.device, err)
		}
	}
	if o.reuseAddr {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return nil, "", "", fmt.Errorf("SO_REUSEADDR: %w", err)
		}
	}
	if o.src.IsValid() {
		if err := unix.Bind(fd, sockaddrFor(family, o.src)); err != nil {
			return nil, "", "", fmt.Errorf("bind %s: %w", o.src, err)
		}
	}
	if local, peer, err = connectBy(fd, family, o); err != nil {
		return nil, "", "", err
	}
	f := os.NewFile(uintptr(fd), "socket")
	closeFD = false
	defer f.Close() // FileConn holds its own duplicate
	c, err = net.FileConn(f)
	if err != nil {
		return nil, "", "", err
	}
	return c, local, peer, nil
}

// waitConnected waits for a non-blocking connect to finish, bounded by timeout.
func waitConnected(fd int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return unix.ETIMEDOUT
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		n, err := unix.Poll(pfd, int(left.Milliseconds())+1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			continue // the loop's deadline check decides
		}
		soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			return err
		}
		if soerr != 0 {
			return unix.Errno(soerr)
		}
		return nil
	}
}

// classify names an error the way the records do.
func classify(err error) string {
	var errno unix.Errno
	switch {
	case err == nil:
		return OutcomeOK
	case errors.Is(err, unix.ECONNREFUSED):
		return OutcomeRefused
	case errors.Is(err, unix.ECONNRESET), errors.Is(err, unix.EPIPE):
		return OutcomeReset
	case errors.Is(err, unix.ETIMEDOUT), errors.Is(err, os.ErrDeadlineExceeded):
		return OutcomeTimeout
	case errors.Is(err, unix.EHOSTUNREACH), errors.Is(err, unix.ENETUNREACH):
		return OutcomeUnreach
	case errors.Is(err, io.EOF):
		return OutcomeEOF
	case errors.As(err, &errno):
		return OutcomeErrPrefix + unix.ErrnoName(errno)
	default:
		return OutcomeErrPrefix + err.Error()
	}
}

// soMark reads SO_MARK of a socket.
func soMark(fd int) uint32 {
	v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK)
	if err != nil {
		return 0
	}
	return uint32(v)
}

// originalDst asks getsockopt(SOL_IP, SO_ORIGINAL_DST) with a 128-byte buffer, as the
// real proxy does, and returns the address and the length the kernel reported.
func originalDst(fd int) (netip.AddrPort, int, error) {
	return askOriginalDst(fd, unix.SOL_IP, soOriginalDst)
}

// originalDst6 asks getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST), the real proxy's
// second try.
func originalDst6(fd int) (netip.AddrPort, int, error) {
	return askOriginalDst(fd, unix.SOL_IPV6, soOriginalDst6)
}

func askOriginalDst(fd, level, opt int) (netip.AddrPort, int, error) {
	var buf [128]byte
	size := uint32(len(buf))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
	if e != 0 {
		return netip.AddrPort{}, int(size), e
	}
	family := binary.NativeEndian.Uint16(buf[0:2])
	switch family {
	case unix.AF_INET:
		port := binary.BigEndian.Uint16(buf[2:4])
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port), int(size), nil
	case unix.AF_INET6:
		port := binary.BigEndian.Uint16(buf[2:4])
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])), port), int(size), nil
	default:
		return netip.AddrPort{}, int(size), fmt.Errorf("SO_ORIGINAL_DST: family %d", family)
	}
}

// payloadStream is the deterministic payload of a request or reply: both ends generate
// it from the same seed, so integrity is checked without shipping a digest.
func payloadStream(seed string) io.Reader {
	return rand.NewChaCha8(sha256.Sum256([]byte(seed)))
}

// checkPayload reads n bytes from r and says whether they are the expected stream.
func checkPayload(r io.Reader, seed string, n int) (got int64, intact bool, err error) {
	want := sha256.New()
	if _, err := io.CopyN(want, payloadStream(seed), int64(n)); err != nil {
		return 0, false, err
	}
	have := sha256.New()
	got, err = io.CopyN(have, r, int64(n))
	return got, err == nil && string(have.Sum(nil)) == string(want.Sum(nil)), err
}

func upSeed(token string) string   { return "up/" + token }
func downSeed(token string) string { return "down/" + token }

// OriginalDst asks SO_ORIGINAL_DST on a socket as the real proxy does (see
// originalDst), for other harnesses' proxies.
func OriginalDst(fd int) (netip.AddrPort, error) {
	dst, _, err := originalDst(fd)
	return dst, err
}

// OriginalDst6 asks IP6T_SO_ORIGINAL_DST (see originalDst6), for other
// harnesses' proxies.
func OriginalDst6(fd int) (netip.AddrPort, error) {
	dst, _, err := originalDst6(fd)
	return dst, err
}

// WaitConnected waits for a connect in progress on fd (see waitConnected), for other
// harnesses' clients.
func WaitConnected(fd int, timeout time.Duration) error { return waitConnected(fd, timeout) }
