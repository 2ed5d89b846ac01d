package config

import (
	"net/netip"
	"strings"
	"testing"
)

func TestDefaultIsTheReference(t *testing.T) {
	c := Default()
	if err := c.Validate(); err != nil {
		t.Fatalf("default config invalid: %v", err)
	}
	if c.OutboundPort != 15001 || c.InboundPort != 15006 || c.HBONEPort != 15008 ||
		c.ProbeAddr != netip.MustParseAddr("169.254.7.127") || c.ProxyMark != 0x539 ||
		c.ProbeAddr6 != netip.MustParseAddr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff") || !c.IPv6 ||
		c.ConnMark != 0x111 || c.MarkMask != 0xfff || c.RouteTable != 100 || c.RulePriority != 32764 {
		t.Fatalf("default differs from inpod-rules.v4: %+v", c)
	}
}

func TestValidateRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"port zero", func(c *Config) { c.OutboundPort = 0 }, "outbound port must be 1-65535"},
		{"duplicate port", func(c *Config) { c.InboundPort = c.OutboundPort }, "is also the"},
		{"ipv6 probe", func(c *Config) { c.ProbeAddr = netip.MustParseAddr("::1") }, "probe address"},
		{"unset probe", func(c *Config) { c.ProbeAddr = netip.Addr{} }, "probe address"},
		{"ipv4 probe6", func(c *Config) { c.ProbeAddr6 = netip.MustParseAddr("169.254.7.127") }, "IPv6 probe address"},
		{"mapped probe6", func(c *Config) { c.ProbeAddr6 = netip.MustParseAddr("::ffff:169.254.7.127") }, "IPv6 probe address"},
		{"zoned probe6", func(c *Config) { c.ProbeAddr6 = netip.MustParseAddr("fe80::1%eth0") }, "IPv6 probe address"},
		{"mark zero", func(c *Config) { c.ProxyMark = 0 }, "proxy mark must not be 0"},
		{"mask hides mark", func(c *Config) { c.MarkMask = 0xff }, "outside the mark mask"},
		{"mask zero", func(c *Config) { c.MarkMask = 0 }, "mark mask must not be 0"},
		{"same marks", func(c *Config) { c.ConnMark = c.ProxyMark }, "are both"},
		{"main table", func(c *Config) { c.RouteTable = 254 }, "route table"},
		{"priority", func(c *Config) { c.RulePriority = 0 }, "rule priority"},
		{"no pods", func(c *Config) { c.MaxPods = 0 }, "max pods"},
		{"too many flows", func(c *Config) { c.MaxFlows = MaxMaxFlows + 1 }, "max flows"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			tc.mod(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate() = %v, want error containing %q", err, tc.want)
			}
		})
	}
}
