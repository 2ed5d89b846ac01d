package standin

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"
)

// sniff records every distinct TCP connection attempt (SYN without ACK, IPv4 or
// IPv6) that crosses iface, until the agent exits. It needs CAP_NET_RAW.
func (a *agent) sniff(iface string) error {
	ifi, err := net.InterfaceByName(iface)
	if err != nil {
		return err
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		return fmt.Errorf("packet socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		unix.Close(fd)
		return fmt.Errorf("binding the packet socket to %s: %w", iface, err)
	}
	f := os.NewFile(uintptr(fd), "sniff-"+iface)
	a.keep(f)
	go func() {
		buf := make([]byte, 256) // the headers are enough; the rest is cut
		for {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				return // closed
			}
			if ev, ok := synOf(buf[:n]); ok {
				ev.Iface = iface
				a.addWire(ev)
			}
		}
	}()
	return nil
}

func (a *agent) addWire(ev WireEvent) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.wireSeen == nil {
		a.wireSeen = map[WireEvent]bool{}
	}
	if !a.wireSeen[ev] { // retransmissions, and lo showing each packet twice
		a.wireSeen[ev] = true
		a.wire = append(a.wire, ev)
	}
}

// synOf reads an IP packet (no link header) and reports a TCP SYN. IPv6
// extension headers are not followed: the harness's SYNs have none.
func synOf(b []byte) (WireEvent, bool) {
	var src, dst netip.Addr
	var tcp []byte
	switch {
	case len(b) >= 20 && b[0]>>4 == 4 && b[9] == unix.IPPROTO_TCP:
		ihl := int(b[0]&0xf) * 4
		if len(b) < ihl+14 {
			return WireEvent{}, false
		}
		src, dst, tcp = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20])), b[ihl:]
	case len(b) >= 40+14 && b[0]>>4 == 6 && b[6] == unix.IPPROTO_TCP:
		src, dst, tcp = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40])), b[40:]
	default:
		return WireEvent{}, false
	}
	if tcp[13]&0x12 != 0x02 {
		return WireEvent{}, false
	}
	return WireEvent{
		Src: netip.AddrPortFrom(src, binary.BigEndian.Uint16(tcp[0:])).String(),
		Dst: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(tcp[2:])).String(),
	}, true
}

// htons puts v in network order, as packet sockets want their protocol.
func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}
