package main

import (
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
)

// The config flags are parsed by pflag and checked by config.Validate; the CLI
// must never go on (here: as far as looking for bpffs) with a config that
// Validate rejects, nor panic, whatever the flags say.
func FuzzConfigFlags(f *testing.F) {
	d := config.Default()
	f.Add("15001", "15006", "15008", "169.254.7.127", "0x539", "0x111", "0xfff", "100", "32764")
	f.Add("0", "70000", "-1", "::1", "0", "0x111", "0xff", "254", "0")
	f.Add("15001", "15001", "15008", "bogus", "1337", "273", "4095", "1", "32765")
	f.Add(strconv.Itoa(int(d.OutboundPort)), "0x3a9e", "15008", "169.254.7.127", "0x1539", "0x111", "0xffff", "4294967295", "1")
	notBPF := f.TempDir()
	f.Fuzz(func(t *testing.T, out, in, hbone, probe, proxyMark, connMark, mask, table, prio string) {
		vals := map[string]string{"--outbound-port": out, "--inbound-port": in, "--hbone-port": hbone,
			"--probe-addr": probe, "--proxy-mark": proxyMark, "--conn-mark": connMark,
			"--mark-mask": mask, "--route-table": table, "--rule-priority": prio}
		args := []string{"upgrade", "--bpffs", filepath.Join(notBPF, "erd")}
		for k, v := range vals {
			args = append(args, k+"="+v)
		}
		root := newRoot()
		root.SetArgs(args)
		root.SetOut(new(strings.Builder))
		root.SetErr(new(strings.Builder))
		err := root.Execute()
		if err == nil {
			t.Fatalf("upgrade on a directory that is not bpffs succeeded with %v", args)
		}
		if !strings.Contains(err.Error(), "bpffs") {
			return // refused before: a flag or the config
		}
		// It got past the config: the config must be valid.
		u16 := func(s string) uint16 { v, _ := strconv.ParseUint(s, 0, 16); return uint16(v) }
		u32 := func(s string) uint32 { v, _ := strconv.ParseUint(s, 0, 32); return uint32(v) }
		i := func(s string) int { v, _ := strconv.ParseInt(s, 0, 64); return int(v) }
		c := config.Default()
		c.OutboundPort, c.InboundPort, c.HBONEPort = u16(out), u16(in), u16(hbone)
		c.ProxyMark, c.ConnMark, c.MarkMask, c.RouteTable, c.RulePriority = u32(proxyMark), u32(connMark), u32(mask), i(table), i(prio)
		c.ProbeAddr, _ = netip.ParseAddr(probe)
		if verr := c.Validate(); verr != nil {
			t.Fatalf("the CLI went on with a config Validate rejects (%v): %v", verr, args)
		}
	})
}
