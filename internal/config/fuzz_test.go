package config

import (
	"net/netip"
	"testing"
)

// Whatever Validate accepts is a config the programs can implement: ports set
// and distinct, marks set, distinct and inside the mask, an IPv4 probe
// address, a route table and rule priority the kernel will not confuse with
// its own.
func FuzzValidate(f *testing.F) {
	d := Default()
	f.Add(d.OutboundPort, d.InboundPort, d.HBONEPort, []byte{169, 254, 7, 127}, d.ProxyMark, d.ConnMark, d.MarkMask, d.RouteTable, d.RulePriority)
	f.Add(uint16(0), uint16(15006), uint16(15008), []byte{169, 254, 7, 127}, uint32(0x539), uint32(0x111), uint32(0xff), 254, 0)
	f.Add(uint16(1), uint16(1), uint16(2), []byte{}, uint32(1), uint32(1), uint32(0), -1, 32766)
	f.Add(uint16(65535), uint16(1), uint16(2), make([]byte, 16), uint32(0xffffffff), uint32(2), uint32(0xffffffff), 1<<32, 32765)
	f.Fuzz(func(t *testing.T, out, in, hbone uint16, probe []byte, proxyMark, connMark, mask uint32, table, prio int) {
		c := Config{OutboundPort: out, InboundPort: in, HBONEPort: hbone, ProxyMark: proxyMark,
			ConnMark: connMark, MarkMask: mask, RouteTable: table, RulePriority: prio}
		c.ProbeAddr, _ = netip.AddrFromSlice(probe)
		if c.Validate() != nil {
			return
		}
		switch {
		case out == 0 || in == 0 || hbone == 0 || out == in || out == hbone || in == hbone:
			t.Fatalf("accepted ports %d/%d/%d", out, in, hbone)
		case !c.ProbeAddr.Is4():
			t.Fatalf("accepted probe address %v", c.ProbeAddr)
		case mask == 0 || proxyMark == 0 || connMark == 0 || proxyMark == connMark:
			t.Fatalf("accepted marks %#x/%#x mask %#x", proxyMark, connMark, mask)
		case proxyMark&mask != proxyMark || connMark&mask != connMark:
			t.Fatalf("accepted marks %#x/%#x outside mask %#x", proxyMark, connMark, mask)
		case table < 1 || table > 0xffffffff || (table >= 253 && table <= 255):
			t.Fatalf("accepted route table %d", table)
		case prio < 1 || prio > 32765:
			t.Fatalf("accepted rule priority %d", prio)
		}
	})
}
