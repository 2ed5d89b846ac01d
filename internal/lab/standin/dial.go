package standin

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// dial connects as the spec says and runs one exchange: request line (plus payload),
// then the reply.
func dial(spec DialSpec) DialResult {
	dst, err := netip.ParseAddrPort(spec.Dst)
	if err != nil {
		return DialResult{Outcome: OutcomeErrPrefix + "bad dst", Detail: err.Error()}
	}
	var src netip.AddrPort
	if spec.Src != "" {
		if src, err = netip.ParseAddrPort(spec.Src); err != nil {
			return DialResult{Outcome: OutcomeErrPrefix + "bad src", Detail: err.Error()}
		}
	}
	timeout := time.Duration(spec.TimeoutMS) * time.Millisecond
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	sotype := unix.SOCK_STREAM
	if spec.Proto == "udp" {
		sotype = unix.SOCK_DGRAM
		if spec.Method != "" && spec.Method != MethodNonblocking || spec.MPTCP || spec.Gate != "" {
			return DialResult{Outcome: OutcomeErrPrefix + "bad spec", Detail: "UDP dials take no method, MPTCP or gate"}
		}
	}
	header := fmt.Sprintf("%s %s %d\n", requestLinePrefix, spec.Token, spec.Size)
	o := connectOpts{
		sotype: sotype, dst: dst, src: src, mark: spec.Mark, timeout: timeout,
		method: spec.Method, device: spec.Device, mptcp: spec.MPTCP, reuseAddr: spec.ReuseAddr,
		transparent: spec.Transparent,
	}
	if spec.Method == MethodTFOSendto || spec.Method == MethodTFOConnect {
		o.first = []byte(header) // the request line goes with the connect
	}
	c, local, peer, err := rawConnect(o)
	if err != nil {
		return DialResult{Outcome: classify(err), Detail: err.Error()}
	}
	defer c.Close()
	res := DialResult{Local: local, Peer: peer}
	time.Sleep(time.Duration(spec.HoldMS) * time.Millisecond)
	deadline := 2 * timeout
	if spec.Gate != "" {
		deadline += gateHoldMax
	}
	_ = c.SetDeadline(time.Now().Add(deadline))
	if spec.Proto == "udp" {
		exchangeUDP(c, spec, &res)
	} else {
		if o.first != nil {
			header = "" // already sent
		}
		exchangeTCP(c.(*net.TCPConn), spec, header, &res)
	}
	return res
}

func exchangeUDP(c net.Conn, spec DialSpec, res *DialResult) {
	if _, err := fmt.Fprintf(c, "%s %s 0\n", requestLinePrefix, spec.Token); err != nil {
		res.Outcome, res.Detail = classify(err), err.Error()
		return
	}
	buf := make([]byte, 64*1024)
	n, err := c.Read(buf)
	if err != nil {
		res.Outcome, res.Detail = classify(err), err.Error()
		return
	}
	res.Reply = strings.TrimSpace(string(buf[:n]))
	res.Outcome = OutcomeOK
}

// exchangeTCP sends the request (header, unless the connect already carried
// it, then the payload), reads the reply and checks it.
func exchangeTCP(c *net.TCPConn, spec DialSpec, header string, res *DialResult) {
	// Write concurrently with reading: a peer that closes early must not leave the
	// writer stuck, and its close must be seen by the reader.
	werr := make(chan error, 1)
	go func() {
		bw := bufio.NewWriter(c)
		bw.WriteString(header)
		var err error
		if spec.Gate != "" {
			// Hold with the request line out, until the harness lets go.
			if err = bw.Flush(); err == nil {
				err = gates.hold(spec.Gate)
			}
		}
		if err == nil {
			_, err = io.CopyN(bw, payloadStream(upSeed(spec.Token)), int64(spec.Size))
		}
		if err == nil {
			err = bw.Flush()
		}
		if err == nil {
			err = c.CloseWrite()
		}
		werr <- err
	}()
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		if line != "" {
			res.Outcome, res.Reply = OutcomeTruncated, strings.TrimSpace(line)
		} else {
			res.Outcome = classify(err)
		}
		res.Detail = err.Error()
		<-werr
		return
	}
	var name, token string
	var size int
	if _, err := fmt.Sscanf(line, replyLinePrefix+" %s %s %d\n", &name, &token, &size); err != nil || size < 0 {
		res.Outcome, res.Reply = OutcomeErrPrefix+"bad reply", strings.TrimSpace(line)
		<-werr
		return
	}
	got, intact, err := checkPayload(br, downSeed(token), size)
	res.Reply = fmt.Sprintf("%s %s %s %d", replyLinePrefix, name, token, size)
	switch {
	case intact:
		res.Reply += " intact"
		res.Outcome = OutcomeOK
	default:
		res.Reply += fmt.Sprintf(" corrupt(got=%d)", got)
		res.Outcome = OutcomeTruncated
		if err != nil {
			res.Detail = err.Error()
		}
	}
	// The exchange ends with the server's close.
	if res.Outcome == OutcomeOK {
		if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
			res.Outcome = "extra-data-or-" + classify(err)
		}
	}
	if err := <-werr; err != nil && res.Outcome == OutcomeOK {
		res.Outcome, res.Detail = "write-"+classify(err), err.Error()
	}
}

// serveUDP answers datagrams as server `name`. IP_PKTINFO (IPV6_RECVPKTINFO) tells
// which local address a datagram was sent to, and the reply is sent from that same
// address.
func (a *agent) serveUDP(addr, name string) (string, error) {
	network := "udp4"
	if ap, err := netip.ParseAddrPort(addr); err == nil && !ap.Addr().Is4() {
		network = "udp6"
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if network == "udp4" {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_PKTINFO, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_RECVPKTINFO, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(context.Background(), network, addr)
	if err != nil {
		return "", err
	}
	uc := pc.(*net.UDPConn)
	a.keep(uc)
	port := uc.LocalAddr().(*net.UDPAddr).Port
	var mark uint32
	_ = withFD(uc, func(fd int) { mark = soMark(fd) })
	go func() {
		buf := make([]byte, 64*1024)
		oob := make([]byte, 512)
		for {
			n, oobn, _, from, err := uc.ReadMsgUDPAddrPort(buf, oob)
			if err != nil {
				return
			}
			dst := pktinfoDst(oob[:oobn])
			ev := ServerEvent{
				Name: name, Proto: "udp",
				Local: netip.AddrPortFrom(dst, uint16(port)).String(),
				Peer:  from.String(),
				Mark:  mark,
			}
			var token string
			var size int
			if _, err := fmt.Sscanf(string(buf[:n]), requestLinePrefix+" %s %d\n", &token, &size); err != nil {
				ev.Request = fmt.Sprintf("bad-request:%q", buf[:n])
				a.addServerEvent(ev)
				continue
			}
			ev.Request = fmt.Sprintf("%s %s 0 intact", requestLinePrefix, token)
			a.addServerEvent(ev)
			reply := fmt.Sprintf("%s %s %s 0\n", replyLinePrefix, name, token)
			var roob []byte
			switch {
			case dst.Is4():
				roob = unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: dst.As4()})
			case dst.IsValid():
				roob = unix.PktInfo6(&unix.Inet6Pktinfo{Addr: dst.As16()})
			}
			if _, _, err := uc.WriteMsgUDPAddrPort([]byte(reply), roob, from); err != nil {
				a.log.Warn("udp reply", "err", err)
			}
		}
	}()
	return uc.LocalAddr().String(), nil
}

// pktinfoDst extracts the header destination address from an IP_PKTINFO message.
func pktinfoDst(oob []byte) netip.Addr {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return netip.Addr{}
	}
	for _, m := range msgs {
		if m.Header.Level == unix.SOL_IP && m.Header.Type == unix.IP_PKTINFO &&
			len(m.Data) >= int(unsafe.Sizeof(unix.Inet4Pktinfo{})) {
			info := (*unix.Inet4Pktinfo)(unsafe.Pointer(&m.Data[0]))
			return netip.AddrFrom4(info.Addr)
		}
		if m.Header.Level == unix.SOL_IPV6 && m.Header.Type == unix.IPV6_PKTINFO &&
			len(m.Data) >= int(unsafe.Sizeof(unix.Inet6Pktinfo{})) {
			info := (*unix.Inet6Pktinfo)(unsafe.Pointer(&m.Data[0]))
			return netip.AddrFrom16(info.Addr)
		}
	}
	return netip.Addr{}
}
