// Package config is the single source of the values the reference ruleset
// hard-codes: ports, marks, the probe address, the policy route. The eBPF
// programs receive them as load-time constants; nothing is repeated in C.
package config

import (
	"errors"
	"fmt"
	"net/netip"
)

// Config is what inpod-rules.v4/.v6 and inpod-routes.sh/routes6.sh encode.
type Config struct {
	OutboundPort uint16     // REDIRECT --to-ports for new outbound TCP (15001)
	InboundPort  uint16     // REDIRECT --to-ports for new inbound TCP (15006)
	HBONEPort    uint16     // inbound port left alone: the proxy's tunnel (15008)
	ProbeAddr    netip.Addr // kubelet probe source/destination, never redirected (IPv4)
	ProbeAddr6   netip.Addr // its IPv6 twin
	IPv6         bool       // capture IPv6 too (Istio's chart writes the ip6tables twin by default)
	ProxyMark    uint32     // mark on the proxy's own sockets (0x539)
	ConnMark     uint32     // connection mark that routes replies to the proxy (0x111)
	MarkMask     uint32     // marks compare under this mask (0xfff)
	RouteTable   int        // policy route table for ConnMark (100)
	RulePriority int        // ip rule preference (32764)

	// Capacity of the node's shared maps (not part of the ruleset). A full
	// map fails closed: a pod beyond MaxPods is refused at attach, a
	// connection beyond MaxFlows evicts the oldest tracked one (LRU).
	MaxPods  uint32 // pods per node (16384)
	MaxFlows uint32 // redirected connections tracked at once, per direction (65536)
}

// Limits of the capacity settings: beyond them the kernel would be asked for
// more memory than any node needs.
const (
	MaxMaxPods  = 1 << 16
	MaxMaxFlows = 1 << 24
)

// Default returns the reference's values.
func Default() Config {
	return Config{
		OutboundPort: 15001,
		InboundPort:  15006,
		HBONEPort:    15008,
		ProbeAddr:    netip.MustParseAddr("169.254.7.127"),
		ProbeAddr6:   netip.MustParseAddr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff"),
		IPv6:         true,
		ProxyMark:    0x539,
		ConnMark:     0x111,
		MarkMask:     0xfff,
		RouteTable:   100,
		RulePriority: 32764,
		MaxPods:      16384,
		MaxFlows:     65536,
	}
}

// Validate reports every value that would make the redirect wrong.
func (c Config) Validate() error {
	var errs []error
	ports := map[string]uint16{"outbound port": c.OutboundPort, "inbound port": c.InboundPort, "hbone port": c.HBONEPort}
	seen := map[uint16]string{}
	for _, name := range []string{"outbound port", "inbound port", "hbone port"} {
		p := ports[name]
		if p == 0 {
			errs = append(errs, fmt.Errorf("%s must be 1-65535, got 0", name))
			continue
		}
		if other, dup := seen[p]; dup {
			errs = append(errs, fmt.Errorf("%s %d is also the %s", name, p, other))
		}
		seen[p] = name
	}
	if !c.ProbeAddr.Is4() {
		errs = append(errs, fmt.Errorf("probe address must be an IPv4 address, got %q", c.ProbeAddr))
	}
	if !c.ProbeAddr6.Is6() || c.ProbeAddr6.Is4In6() || c.ProbeAddr6.Zone() != "" {
		errs = append(errs, fmt.Errorf("IPv6 probe address must be an IPv6 address (not IPv4-mapped, no zone), got %q", c.ProbeAddr6))
	}
	if c.MarkMask == 0 {
		errs = append(errs, errors.New("mark mask must not be 0"))
	}
	for _, m := range []struct {
		name string
		v    uint32
	}{{"proxy mark", c.ProxyMark}, {"connection mark", c.ConnMark}} {
		switch {
		case m.v == 0:
			errs = append(errs, fmt.Errorf("%s must not be 0", m.name))
		case m.v&c.MarkMask != m.v:
			errs = append(errs, fmt.Errorf("%s %#x has bits outside the mark mask %#x", m.name, m.v, c.MarkMask))
		}
	}
	if c.ProxyMark != 0 && c.ProxyMark == c.ConnMark {
		errs = append(errs, fmt.Errorf("proxy mark and connection mark are both %#x", c.ProxyMark))
	}
	// 253-255 are the kernel's default, main and local tables.
	if c.RouteTable < 1 || c.RouteTable > 0xffffffff || (c.RouteTable >= 253 && c.RouteTable <= 255) {
		errs = append(errs, fmt.Errorf("route table must be 1-252 or 256-4294967295, got %d", c.RouteTable))
	}
	// 0 is the local-table rule, 32766/32767 main and default.
	if c.RulePriority < 1 || c.RulePriority > 32765 {
		errs = append(errs, fmt.Errorf("rule priority must be 1-32765, got %d", c.RulePriority))
	}
	if c.MaxPods < 1 || c.MaxPods > MaxMaxPods {
		errs = append(errs, fmt.Errorf("max pods must be 1-%d, got %d", MaxMaxPods, c.MaxPods))
	}
	if c.MaxFlows < 1 || c.MaxFlows > MaxMaxFlows {
		errs = append(errs, fmt.Errorf("max flows must be 1-%d, got %d", MaxMaxFlows, c.MaxFlows))
	}
	return errors.Join(errs...)
}
