package test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/privtest"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
	"github.com/ebpf-redirect/ebpf-redirect/internal/redirect"
)

// cliResult is one run of the ebpf-redirect binary.
type cliResult struct {
	code   int
	output string
}

func runCLI(t *testing.T, env []string, args ...string) cliResult {
	t.Helper()
	return runBinary(t, ebpfBinary(t), env, args...)
}

// runFaultCLI runs the faultinject build (see faultBinary).
func runFaultCLI(t *testing.T, env []string, args ...string) cliResult {
	t.Helper()
	return runBinary(t, faultBinary(t), env, args...)
}

func runBinary(t *testing.T, bin string, env []string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return cliResult{0, string(out)}
	case errors.As(err, &ee):
		return cliResult{ee.ExitCode(), string(out)}
	default:
		t.Fatalf("running %v: %v", args, err)
		return cliResult{}
	}
}

// lifecycleRun gives a test a run (bpffs, cgroup subtree) and removes it after.
func lifecycleRun(t *testing.T) *topology.Run {
	t.Helper()
	privtest.Require(t, "iptables-restore")
	r, err := topology.NewRun()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("cleaning up run: %v", err)
		}
	})
	return r
}

func newPod(t *testing.T, r *topology.Run) *topology.Pod {
	t.Helper()
	p, err := r.NewPod()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func attachArgs(r *topology.Run, p *topology.Pod) []string {
	return []string{"attach", "--pod-id", p.ID, "--netns", p.NetNSPath(), "--cgroup", p.PodCgroup,
		"--proxy-cgroup", p.ProxyCgrp, "--bpffs", r.BPFFS}
}

// podState is what of a pod can be seen from outside: pins, map entries, the
// policy route, the sysctl.
type podState struct {
	pins       []string
	podEntries int
	ruleCount  int
	sysctls    string
}

func pinsUnder(t *testing.T, dir string) []string {
	var out []string
	_ = filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		// maps.debug and progs.debug are the kernel's own, at the mount's root.
		if err == nil && !d.IsDir() && !strings.HasSuffix(path, ".debug") {
			rel, _ := filepath.Rel(dir, path)
			out = append(out, rel)
		}
		return nil
	})
	return out
}

func mapEntries(t *testing.T, path string) int {
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatalf("opening %s: %v", path, err)
	}
	defer m.Close()
	// Keys only: values of per-CPU maps need their own types.
	n := 0
	var prev []byte
	for {
		next := make([]byte, m.KeySize())
		var err error
		if prev == nil {
			err = m.NextKey(nil, &next)
		} else {
			err = m.NextKey(prev, &next)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return n
		}
		if err != nil {
			t.Fatalf("iterating %s: %v", path, err)
		}
		n++
		prev = next
	}
}

// podHandle is a netlink handle in the pod's namespace, closed with the test.
func podHandle(t *testing.T, p *topology.Pod) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(p.NetNSPath())
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

func inspectPod(t *testing.T, r *topology.Run, p *topology.Pod) podState {
	t.Helper()
	var s podState
	for _, pin := range pinsUnder(t, r.BPFFS) {
		if strings.HasPrefix(pin, "pods/"+p.ID+"/") {
			s.pins = append(s.pins, pin)
		}
	}
	s.podEntries = mapEntries(t, filepath.Join(r.BPFFS, "dp", "maps", "pods"))
	h := podHandle(t, p)
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rules, err := h.RuleList(fam)
		if err != nil {
			t.Fatal(err)
		}
		for _, ru := range rules {
			if ru.Table == 100 && ru.Mark == 0x111 {
				s.ruleCount++
			}
		}
	}
	out, err := exec.Command("ip", "netns", "exec", p.NetNS, "cat", "/proc/sys/net/ipv4/tcp_fwmark_accept",
		"/proc/sys/net/ipv4/fwmark_reflect", "/proc/sys/net/ipv6/fwmark_reflect").Output()
	if err != nil {
		t.Fatal(err)
	}
	s.sysctls = strings.Join(strings.Fields(string(out)), ",")
	return s
}

// podPins is how many links an attached pod with that many interfaces pins:
// one per hook of the object (pod cgroup, tc per interface, lo).
func podPins(t *testing.T, ifaces int) int {
	t.Helper()
	n := 0
	for scope, times := range map[string]int{datapath.ScopePod: 1, datapath.ScopeTC: ifaces, datapath.ScopeLo: 1} {
		hooks, err := datapath.HookSpecs(scope)
		if err != nil {
			t.Fatal(err)
		}
		n += len(hooks) * times
	}
	return n
}

// The sysctls attach sets (tcp_fwmark_accept, fwmark_reflect of both
// families), as inspectPod reads them, and before.
const (
	sysctlsOn  = "1,1,1"
	sysctlsOff = "0,0,0"
)

func TestAttachDetachLifecycle(t *testing.T) {
	r := lifecycleRun(t)
	p := newPod(t, r)

	before := inspectPod(t, r, p)
	if res := runCLI(t, nil, attachArgs(r, p)...); res.code != 0 {
		t.Fatalf("attach failed (%d): %s", res.code, res.output)
	}
	on := inspectPod(t, r, p)
	wantPins := []string{"pod_connect4", "pod_connect6", "pod_getpeername4", "pod_getpeername6", "pod_sockops", "pod_sock_ingress", "pod_getsockopt",
		"tcx_pod_egress_", "tcx_pod_ingress_", "tcx_pod_lo_ingress_1"}
	for _, w := range wantPins {
		found := false
		for _, pin := range on.pins {
			found = found || strings.HasPrefix(pin, "pods/"+p.ID+"/"+w)
		}
		if !found {
			t.Errorf("after attach, no pin %s* in %v", w, on.pins)
		}
	}
	if on.podEntries != 1 || on.ruleCount != 2 || on.sysctls != sysctlsOn {
		t.Errorf("after attach: %+v, want 1 pod entry, 2 rules (IPv4, IPv6), sysctls %s", on, sysctlsOn)
	}
	if len(pinsUnder(t, filepath.Join(r.BPFFS, "proxy"))) != 1 {
		t.Errorf("no getsockopt link pinned for the proxy cgroup")
	}
	// Attaching again is a no-op that says so.
	if res := runCLI(t, nil, attachArgs(r, p)...); res.code != 0 || !strings.Contains(res.output, "already attached") {
		t.Errorf("second attach: %d %s", res.code, res.output)
	}
	if again := inspectPod(t, r, p); !equalState(again, on) {
		t.Errorf("second attach changed state: %+v, was %+v", again, on)
	}
	if res := runCLI(t, nil, "list", "--bpffs", r.BPFFS); res.code != 0 || !strings.Contains(res.output, p.ID) || !strings.Contains(res.output, "healthy") {
		t.Errorf("list: %d %s", res.code, res.output)
	}

	if res := runCLI(t, nil, "detach", "--pod-id", p.ID, "--bpffs", r.BPFFS); res.code != 0 {
		t.Fatalf("detach failed (%d): %s", res.code, res.output)
	}
	after := inspectPod(t, r, p)
	if len(after.pins) != 0 || after.podEntries != 0 || after.ruleCount != before.ruleCount || after.sysctls != before.sysctls {
		t.Errorf("after detach: %+v, want as before attach: %+v", after, before)
	}
	if left := pinsUnder(t, r.BPFFS); len(left) != 0 {
		t.Errorf("detaching the last pod left pins: %v", left)
	}
}

// badInputFixture is a run with one attached pod (good, as it was after the
// attach), one pod to try bad inputs on (other), a regular file where a netns
// is expected, and a cgroup path that existed and was removed.
type badInputFixture struct {
	r                *topology.Run
	good, other      *topology.Pod
	goodBefore       podState
	regular, removed string
}

func newBadInputFixture(t *testing.T, removedName string) badInputFixture {
	t.Helper()
	f := badInputFixture{r: lifecycleRun(t)}
	f.good, f.other = newPod(t, f.r), newPod(t, f.r)
	if res := runCLI(t, nil, attachArgs(f.r, f.good)...); res.code != 0 {
		t.Fatalf("attach failed: %s", res.output)
	}
	t.Cleanup(func() { runCLI(t, nil, "detach", "--pod-id", f.good.ID, "--bpffs", f.r.BPFFS) })
	f.goodBefore = inspectPod(t, f.r, f.good)
	f.regular = filepath.Join(t.TempDir(), "not-a-netns")
	if err := os.WriteFile(f.regular, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	f.removed = filepath.Join(f.r.CgroupDir, removedName)
	if err := os.Mkdir(f.removed, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(f.removed); err != nil {
		t.Fatal(err)
	}
	return f
}

// Every bad input is refused with an error naming the problem and a non-zero
// exit, creates nothing, and leaves an already attached pod as it was.
func TestBadInputIsRefused(t *testing.T) {
	bf := newBadInputFixture(t, "removed-cgroup")
	r, good, other, goodBefore, regular, removed := bf.r, bf.good, bf.other, bf.goodBefore, bf.regular, bf.removed
	notBPF := filepath.Join(t.TempDir(), "erd")

	base := func(mod func(a map[string]string)) []string {
		a := map[string]string{"--pod-id": other.ID, "--netns": other.NetNSPath(), "--cgroup": other.PodCgroup,
			"--proxy-cgroup": other.ProxyCgrp, "--bpffs": r.BPFFS}
		mod(a)
		args := []string{"attach"}
		for _, k := range []string{"--pod-id", "--netns", "--cgroup", "--proxy-cgroup", "--bpffs"} {
			args = append(args, k, a[k])
		}
		return args
	}
	set := func(k, v string) func(map[string]string) { return func(a map[string]string) { a[k] = v } }

	cases := []struct {
		name string
		args []string
		want string
	}{
		{"missing netns", base(set("--netns", "/run/netns/erd-does-not-exist")), "no such file"},
		{"netns is a regular file", base(set("--netns", regular)), "not a network namespace"},
		{"cgroup is not a cgroup", base(set("--cgroup", t.TempDir())), "not on a cgroup v2"},
		{"root cgroup", base(set("--cgroup", r.CgroupFS)), "root cgroup"},
		{"removed cgroup", base(set("--cgroup", removed)), "no such file"},
		{"proxy cgroup is not a cgroup", base(set("--proxy-cgroup", t.TempDir())), "proxy cgroup"},
		{"pod id with slash", base(set("--pod-id", "a/b")), "pod id"},
		{"pod id dotdot", base(set("--pod-id", "..")), "pod id"},
		{"pod id with space", base(set("--pod-id", "a b")), "pod id"},
		{"pod id empty", base(set("--pod-id", "")), "pod id is empty"},
		{"pod id too long", base(set("--pod-id", strings.Repeat("a", 64))), "at most 63"},
		{"bpffs not mounted", base(set("--bpffs", notBPF)), "not on a bpf filesystem"},
		{"same pod id, another netns", base(set("--pod-id", good.ID)), "already attached with netns"},
		{"same netns as another pod", base(set("--netns", good.NetNSPath())), "already attached as pod"},
		{"same cgroup as another pod", base(set("--cgroup", good.PodCgroup)), "already attached as pod"},
		{"detach unknown pod", []string{"detach", "--pod-id", "erd-never-attached", "--bpffs", r.BPFFS}, "not attached"},
		{"port zero", append(base(func(map[string]string) {}), "--outbound-port", "0"), "outbound port must be 1-65535"},
		{"port too large", append(base(func(map[string]string) {}), "--inbound-port", "70000"), "out of range"},
		{"mark zero", append(base(func(map[string]string) {}), "--proxy-mark", "0"), "proxy mark must not be 0"},
		{"mask hides the mark", append(base(func(map[string]string) {}), "--mark-mask", "0xff"), "outside the mark mask"},
		{"probe address not IPv4", append(base(func(map[string]string) {}), "--probe-addr", "::1"), "probe address"},
		{"unknown flag", append(base(func(map[string]string) {}), "--bogus"), "unknown flag"},
	}
	// cgroup v1 is only there on hybrid hosts.
	for _, v1 := range []string{"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/memory"} {
		var fs unix.Statfs_t
		if unix.Statfs(v1, &fs) == nil && fs.Type == unix.CGROUP_SUPER_MAGIC {
			cases = append(cases, struct {
				name string
				args []string
				want string
			}{"cgroup v1 path", base(set("--cgroup", v1)), "cgroup v1"})
			break
		}
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := runCLI(t, nil, tc.args...)
			if res.code == 0 {
				t.Fatalf("exit 0, want an error containing %q; output: %s", tc.want, res.output)
			}
			if !strings.Contains(res.output, tc.want) {
				t.Fatalf("error does not name the problem: want %q in %q", tc.want, res.output)
			}
			if st := inspectPod(t, r, other); len(st.pins) != 0 || st.ruleCount != 0 {
				t.Fatalf("refused attach left state behind: %+v", st)
			}
			if now := inspectPod(t, r, good); !equalState(now, goodBefore) {
				t.Fatalf("attached pod changed: %+v, was %+v", now, goodBefore)
			}
		})
	}
}

func equalState(a, b podState) bool {
	return strings.Join(a.pins, ",") == strings.Join(b.pins, ",") && a.podEntries == b.podEntries &&
		a.ruleCount == b.ruleCount && a.sysctls == b.sysctls
}

// An attach that fails at any step undoes the steps before it.
func TestFailedAttachLeavesNothing(t *testing.T) {
	r := lifecycleRun(t)
	// The node's first pod failing leaves no datapath behind either.
	first := newPod(t, r)
	res := runFaultCLI(t, []string{faultEnv + "=done"}, attachArgs(r, first)...)
	if res.code == 0 {
		t.Fatalf("want the injected fault: %s", res.output)
	}
	if left := pinsUnder(t, r.BPFFS); len(left) != 0 {
		t.Fatalf("failed first attach left pins: %v", left)
	}

	good := newPod(t, r)
	if res := runCLI(t, nil, attachArgs(r, good)...); res.code != 0 {
		t.Fatalf("attach failed: %s", res.output)
	}
	t.Cleanup(func() { runCLI(t, nil, "detach", "--pod-id", good.ID, "--bpffs", r.BPFFS) })
	goodBefore := inspectPod(t, r, good)

	for _, step := range redirect.AttachSteps() {
		t.Run("fault before "+step, func(t *testing.T) {
			p := newPod(t, r)
			before := inspectPod(t, r, p)
			res := runFaultCLI(t, []string{faultEnv + "=" + step}, attachArgs(r, p)...)
			if res.code == 0 || !strings.Contains(res.output, "injected fault before "+step) {
				t.Fatalf("want the injected fault, got %d: %s", res.code, res.output)
			}
			if after := inspectPod(t, r, p); !equalState(after, before) {
				t.Fatalf("failed attach left state: %+v, before %+v", after, before)
			}
			if res := runCLI(t, nil, "list", "--bpffs", r.BPFFS); strings.Contains(res.output, p.ID) {
				t.Fatalf("failed attach left a record: %s", res.output)
			}
			if now := inspectPod(t, r, good); !equalState(now, goodBefore) {
				t.Fatalf("attached pod changed: %+v, was %+v", now, goodBefore)
			}
			// And the pod can then be attached for real.
			if res := runCLI(t, nil, attachArgs(r, p)...); res.code != 0 {
				t.Fatalf("attach after a failed one: %s", res.output)
			}
			if res := runCLI(t, nil, "detach", "--pod-id", p.ID, "--bpffs", r.BPFFS); res.code != 0 {
				t.Fatalf("detach: %s", res.output)
			}
		})
	}
}

// On a machine with no bpffs at /sys/fs/bpf, attach (with the default
// --bpffs) mounts one there and says so; the pod is then attached, listed
// and detached as usual. Run in a private mount namespace, which makes the
// machine "fresh" whatever it has mounted, and takes the mount away after.
func TestAttachMountsBPFFSOnAFreshMachine(t *testing.T) {
	r := lifecycleRun(t)
	p := newPod(t, r)
	privtest.Require(t, "unshare")
	bin := ebpfBinary(t)
	script := `set -e
umount -l /sys/fs/bpf 2>/dev/null || true
if [ "$(stat -f -c %T /sys/fs/bpf)" = bpf_fs ]; then echo "still a bpffs" >&2; exit 3; fi
"$0" attach --pod-id "$1" --netns "$2" --cgroup "$3" --proxy-cgroup "$4"
"$0" list
[ "$(stat -f -c %T /sys/fs/bpf)" = bpf_fs ]
"$0" detach --pod-id "$1"`
	out, err := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script,
		bin, p.ID, p.NetNSPath(), p.PodCgroup, p.ProxyCgrp).CombinedOutput()
	if err != nil {
		t.Fatalf("attach on a fresh machine: %v\n%s", err, out)
	}
	for _, want := range []string{"mounted a bpffs", "at=/sys/fs/bpf", "pod " + p.ID + " attached", p.ID + " ", "healthy", "pod " + p.ID + " detached"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if st := inspectPod(t, r, p); st.ruleCount != 0 || st.sysctls != sysctlsOff {
		t.Errorf("the pod was not left as before: %+v", st)
	}
}
