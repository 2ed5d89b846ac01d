package rules

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/reference"
)

// referenceLines indexes the -A lines of an embedded ruleset as
// "table CHAIN n".
func referenceLines(t *testing.T, file string) map[string]string {
	out := map[string]string{}
	table := ""
	n := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(reference.File(file)))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "*"):
			table = line[1:]
		case strings.HasPrefix(line, "-A "):
			k := table + " " + strings.Fields(line)[1]
			n[k]++
			out[fmt.Sprintf("%s %d", k, n[k])] = line
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// With the default config, every rule renders as the reference's own line,
// of both families' rulesets.
func TestDefaultRendersTheReference(t *testing.T) {
	files := map[string]map[string]string{IPv4: referenceLines(t, "inpod-rules.v4"), IPv6: referenceLines(t, "inpod-rules.v6")}
	all := All(config.Default())
	if len(all) != 2*int(datapath.RuleMax-1) {
		t.Errorf("%d rules rendered, want every rule of both families", len(all))
	}
	for _, i := range all {
		lines := files[i.Family]
		if i.Name == "" || i.Text == "" {
			t.Errorf("rule %v has no name or text: %+v", i.Rule, i)
		}
		want, isLine := lines[i.Chain]
		if isLine && i.Text != want {
			t.Errorf("%s renders %q, the reference says %q", i.Name, i.Text, want)
		}
		if !isLine && strings.HasPrefix(i.Text, "-A ") {
			t.Errorf("%s (%s) renders a line the reference does not have: %q", i.Name, i.Chain, i.Text)
		}
	}
}

// Another config renders its own values, never the reference's.
func TestRendersTheLiveConfig(t *testing.T) {
	c := config.Default()
	c.OutboundPort, c.InboundPort, c.HBONEPort = 25001, 25006, 25008
	c.ProxyMark, c.ConnMark, c.MarkMask = 0x7a50, 0x2220, 0xfff0
	c.ProbeAddr = netip.MustParseAddr("169.254.9.9")
	c.IPv6 = false
	for name, want := range map[string][]string{
		"out-probe":        {"-d 169.254.9.9/32"},
		"out-connmark":     {"--mark 0x2220/0xfff0"},
		"out-redirect":     {"! --mark 0x7a50/0xfff0", "--to-ports 25001"},
		"in-probe":         {"-s 169.254.9.9/32"},
		"in-redirect":      {"! --dport 25008", "! --mark 0x7a50/0xfff0", "--to-ports 25006"},
		"connmark-restore": {"--mark 0x2220/0xfff0"},
		"out-untouched":    {"0x7a50/0xfff0"},
	} {
		var got string
		for _, i := range All(c) {
			if i.Name == name {
				if i.Family != IPv4 {
					t.Errorf("%s rendered for %s with IPv6 off", name, i.Family)
				}
				got = i.Text
			}
		}
		for _, w := range want {
			if !strings.Contains(got, w) {
				t.Errorf("%s = %q, want %q in it", name, got, w)
			}
		}
		for _, old := range []string{"15001", "15006", "15008", "0x539", "169.254.7.127"} {
			if strings.Contains(got, old) {
				t.Errorf("%s = %q shows the default %s", name, got, old)
			}
		}
	}
}
