package test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
	"github.com/ebpf-redirect/ebpf-redirect/manager"
)

// explainCase is one live connection, and the explain query for it.
type explainCase struct {
	name    string
	from    func(*livePod) *standin.Agent
	dial    standin.DialSpec
	explain []string
	// before runs first (a change of the pod's state).
	before func(t *testing.T)
}

func fromApp(lp *livePod) *standin.Agent  { return lp.app }
func fromPeer(lp *livePod) *standin.Agent { return lp.peer }

// explain runs the pod's own decision code (bpf/explain.c) and predicts the
// rule the datapath counts for each connection: every branch of both chains,
// under the reference's config and under another one (other ports and marks),
// whose text stats and explain render.
func TestExplainNamesTheRuleTheDatapathCounts(t *testing.T) {
	for _, tc := range []struct {
		name     string
		flags    []string
		out      int    // the outbound port
		proxy    string // the proxy mark
		notProxy string // a mark that is not it
		hbone    int
		// proxied: the stand-in proxy listens on the ports the config
		// redirects to (it listens on the reference's).
		proxied bool
	}{
		{"reference config", nil, 15001, "0x539", "0x53a", 15008, true},
		{"other ports and marks", []string{"--outbound-port", "16001", "--inbound-port", "16006", "--hbone-port", "16008", "--proxy-mark", "0x777"}, 16001, "0x777", "0x539", 16008, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := lifecycleRun(t)
			lp := newLivePod(t, r)
			if res := runCLI(t, nil, append(attachArgs(r, lp.pod), tc.flags...)...); res.code != 0 {
				t.Fatalf("attach: %s", res.output)
			}
			t.Cleanup(func() { runCLI(t, nil, "detach", "--pod-id", lp.pod.ID, "--bpffs", r.BPFFS) })
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			if _, err := lp.peer.Listen(ctx, standin.ListenSpec{Proto: "tcp", Addr: "169.254.7.127:81"}); err != nil {
				t.Fatal(err)
			}
			for _, l := range []standin.ListenSpec{
				{Proto: "tcp", Addr: "[::]:80", V6Only: true},
				{Proto: "tcp", Addr: "[fd16:9254:7127:1337:ffff:ffff:ffff:ffff]:81"},
			} {
				if _, err := lp.peer.Listen(ctx, l); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := lp.app.Listen(ctx, standin.ListenSpec{Proto: "tcp", Addr: "[::]:8080", V6Only: true}); err != nil {
				t.Fatal(err)
			}
			if !tc.proxied { // the proxy holds 15008; another HBONE port is the app's
				if _, err := lp.app.Listen(ctx, standin.ListenSpec{Proto: "tcp", Addr: fmt.Sprintf("0.0.0.0:%d", tc.hbone)}); err != nil {
					t.Fatal(err)
				}
			}
			addressless := addAddresslessLink(t, r, lp.pod)
			in := func(src, dst string) []string { return []string{"--in", "--src", src, "--dst", dst} }
			cases := []explainCase{
				{name: "redirect", from: fromApp, dial: standin.DialSpec{Dst: "10.77.0.1:80"}, explain: []string{"--dst", "10.77.0.1:80"}},
				{name: "probe", from: fromApp, dial: standin.DialSpec{Dst: "169.254.7.127:81"}, explain: []string{"--dst", "169.254.7.127:81"}},
				{name: "proxy mark", from: fromApp, dial: standin.DialSpec{Dst: "10.77.0.1:80", Mark: mark(tc.proxy)}, explain: []string{"--dst", "10.77.0.1:80", "--mark", tc.proxy}},
				{name: "not the proxy mark", from: fromApp, dial: standin.DialSpec{Dst: "10.77.0.1:80", Mark: mark(tc.notProxy)}, explain: []string{"--dst", "10.77.0.1:80", "--mark", tc.notProxy}},
				{name: "conn mark", from: fromApp, dial: standin.DialSpec{Dst: "10.77.0.1:80", Mark: 0x111}, explain: []string{"--dst", "10.77.0.1:80", "--mark", "0x111"}},
				{name: "own address", from: fromApp, dial: standin.DialSpec{Dst: "10.77.0.2:8080"}, explain: []string{"--dst", "10.77.0.2:8080"}},
				{name: "127.0.0.2", from: fromApp, dial: standin.DialSpec{Dst: "127.0.0.2:8080"}, explain: []string{"--dst", "127.0.0.2:8080"}},
				{name: "127.0.0.1", from: fromApp, dial: standin.DialSpec{Dst: "127.0.0.1:8080"}, explain: []string{"--dst", "127.0.0.1:8080"}},
				{name: "bound to lo", from: fromApp, dial: standin.DialSpec{Dst: "10.77.0.1:80", Device: "lo", TimeoutMS: 300}, explain: []string{"--dst", "10.77.0.1:80", "--device", "lo"}},
				{name: "inbound redirect", from: fromPeer, dial: standin.DialSpec{Dst: "10.77.0.2:8080"}, explain: in("10.77.0.1:40000", "10.77.0.2:8080")},
				{name: "inbound hbone", from: fromPeer, dial: standin.DialSpec{Dst: fmt.Sprintf("10.77.0.2:%d", tc.hbone)}, explain: in("10.77.0.1:40000", fmt.Sprintf("10.77.0.2:%d", tc.hbone))},
				{name: "inbound probe", from: fromPeer, dial: standin.DialSpec{Dst: "10.77.0.2:8080", Src: "169.254.7.127:0"}, explain: in("169.254.7.127:40000", "10.77.0.2:8080")},
				{name: "inbound on an interface without an address", from: fromPeer, dial: standin.DialSpec{Dst: addressless.dst + ":8080", TimeoutMS: 300},
					explain: append(in("10.79.0.1:40000", addressless.dst+":8080"), "--iface", addressless.name)},
				{name: "ipv6 redirect", from: fromApp, dial: standin.DialSpec{Dst: "[fd00:77::1]:80"}, explain: []string{"--dst", "[fd00:77::1]:80"}},
				{name: "ipv6 probe", from: fromApp, dial: standin.DialSpec{Dst: "[fd16:9254:7127:1337:ffff:ffff:ffff:ffff]:81"}, explain: []string{"--dst", "[fd16:9254:7127:1337:ffff:ffff:ffff:ffff]:81"}},
				{name: "ipv6 proxy mark", from: fromApp, dial: standin.DialSpec{Dst: "[fd00:77::1]:80", Mark: mark(tc.proxy)}, explain: []string{"--dst", "[fd00:77::1]:80", "--mark", tc.proxy}},
				{name: "ipv6 own address", from: fromApp, dial: standin.DialSpec{Dst: "[fd00:77::2]:8080"}, explain: []string{"--dst", "[fd00:77::2]:8080"}},
				{name: "ipv6 own link-local address", from: fromApp, dial: standin.DialSpec{Dst: "[fe80::2%eth0]:8080"}, explain: []string{"--dst", "[fe80::2]:8080"}},
				{name: "::1", from: fromApp, dial: standin.DialSpec{Dst: "[::1]:8080"}, explain: []string{"--dst", "[::1]:8080"}},
				{name: "v4-mapped", from: fromApp, dial: standin.DialSpec{Dst: "[::ffff:10.77.0.1]:80"}, explain: []string{"--dst", "[::ffff:10.77.0.1]:80"}},
				{name: "ipv6 inbound redirect", from: fromPeer, dial: standin.DialSpec{Dst: "[fd00:77::2]:8080"}, explain: in("[fd00:77::1]:40000", "[fd00:77::2]:8080")},
				{name: "ipv6 inbound probe", from: fromPeer, dial: standin.DialSpec{Dst: "[fd00:77::2]:8080", Src: "[fd16:9254:7127:1337:ffff:ffff:ffff:ffff]:0"},
					explain: in("[fd16:9254:7127:1337:ffff:ffff:ffff:ffff]:40000", "[fd00:77::2]:8080")},
				{name: "no state for the pod", from: fromApp, dial: standin.DialSpec{Dst: "10.77.0.1:80"}, explain: []string{"--dst", "10.77.0.1:80"},
					before: func(t *testing.T) {
						m := pinnedMap(t, r.BPFFS, "pods")
						if err := m.Delete(podCookie(t, r, lp.pod.ID)); err != nil {
							t.Fatal(err)
						}
					}},
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					if c.before != nil {
						c.before(t)
					}
					res := runCLI(t, nil, append([]string{"explain", "--pod-id", lp.pod.ID, "--json", "--bpffs", r.BPFFS}, c.explain...)...)
					var d manager.Decision
					if err := json.Unmarshal([]byte(res.output), &d); err != nil {
						t.Fatalf("explain: %v: %s", err, res.output)
					}
					before := ruleCounts(t, r, lp.pod.ID)
					c.dial.Proto, c.dial.Token = "tcp", "explain"
					if _, err := c.from(lp).Dial(ctx, c.dial); err != nil {
						t.Fatal(err)
					}
					after := ruleCounts(t, r, lp.pod.ID)
					var moved []string
					for rule, n := range after {
						if n != before[rule] {
							moved = append(moved, fmt.Sprintf("%s+%d", rule, n-before[rule]))
						}
					}
					sort.Strings(moved)
					fam := d.Rule.Family + "/"
					want := []string{fam + d.Rule.Name + "+1"}
					if d.Rule.Name == "in-redirect" && tc.proxied {
						// The proxy's spoofed connection to the app: its replies come back by the connection mark.
						want = []string{fam + "connmark-restore+1", fam + "in-redirect+1"}
					}
					if strings.Join(moved, ",") != strings.Join(want, ",") {
						t.Fatalf("explain says %s (%s), the datapath counted %v", d.Rule.Name, d.To, moved)
					}
				})
			}
			// The human forms render the node's live config.
			want := fmt.Sprintf("! --mark %s/0xfff -j REDIRECT --to-ports %d", tc.proxy, tc.out)
			res := runCLI(t, nil, "explain", "--pod-id", lp.pod.ID, "--dst", "10.77.0.1:80", "--bpffs", r.BPFFS)
			if !strings.Contains(res.output, "fail-closed") {
				t.Errorf("explain after the pod's state was removed: %s", res.output)
			}
			res = runCLI(t, nil, "stats", "--bpffs", r.BPFFS)
			if !strings.Contains(res.output, want) {
				t.Errorf("stats does not render the live config (%q): %s", want, res.output)
			}
			if res := runCLI(t, nil, "explain", "--pod-id", "erd-nope", "--dst", "10.0.0.1:80", "--bpffs", r.BPFFS); res.code == 0 || !strings.Contains(res.output, "not attached") {
				t.Errorf("explain for an unknown pod: %d %s", res.code, res.output)
			}
		})
	}
}

func mark(s string) uint32 {
	var v uint32
	fmt.Sscanf(s, "0x%x", &v)
	return v
}

// ruleCounts are the pod's counters, by rule name (stats --json).
func ruleCounts(t *testing.T, r *topology.Run, id string) map[string]uint64 {
	t.Helper()
	res := runCLI(t, nil, "stats", "--pod-id", id, "--json", "--bpffs", r.BPFFS)
	var all map[string][]manager.RuleCount
	if err := json.Unmarshal([]byte(res.output), &all); err != nil {
		t.Fatalf("stats --json: %v: %s", err, res.output)
	}
	out := map[string]uint64{}
	for _, rc := range all[id] {
		out[rc.Family+"/"+rc.Rule] = rc.Connections
	}
	return out
}

// podCookie is the netns cookie list --json records for a pod.
func podCookie(t *testing.T, r *topology.Run, id string) uint64 {
	t.Helper()
	p, ok := listed(t, r, id)
	if !ok {
		t.Fatalf("pod %s not listed", id)
	}
	return p.NetnsCookie
}

// addressless is a link of the pod with no address, and an address of the
// pod that R reaches through it.
type addressless struct{ name, dst string }

// addAddresslessLink links the pod to R a second time with no address on the
// pod's side (R gets 10.79.0.1 and a route to the pod's secondary address
// through it), and reconciles so that the tc programs are on it.
func addAddresslessLink(t *testing.T, r *topology.Run, p *topology.Pod) addressless {
	t.Helper()
	const name = "eth9"
	if err := p.AddLink(name, nil, []*net.IPNet{{IP: net.IPv4(10, 79, 0, 1), Mask: net.CIDRMask(24, 32)}}); err != nil {
		t.Fatal(err)
	}
	if err := p.PeerRoute(&net.IPNet{IP: net.IPv4(10, 77, 0, 3), Mask: net.CIDRMask(32, 32)}, name); err != nil {
		t.Fatal(err)
	}
	if res := runCLI(t, nil, "reconcile", "--bpffs", r.BPFFS); res.code != 0 || !strings.Contains(res.output, p.ID) {
		t.Fatalf("reconcile: %s", res.output)
	}
	return addressless{name: name, dst: "10.77.0.3"}
}
