package topology

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/privtest"
)

func TestPodLifecycle(t *testing.T) {
	privtest.Require(t)
	run, err := NewRun()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := run.Close(); err != nil {
			t.Error(err)
		}
	})
	pod, err := run.NewPod()
	if err != nil {
		t.Fatal(err)
	}
	ipIn := func(ns string, args ...string) string {
		t.Helper()
		out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip -n %s %v: %v: %s", ns, args, err, out)
		}
		return string(out)
	}
	addrs := ipIn(pod.NetNS, "-4", "addr", "show", "dev", PodIfName)
	for _, want := range []string{"inet 10.77.0.2/24", "inet 10.77.0.3/24 brd 10.77.0.255 scope global secondary"} {
		if !strings.Contains(addrs, want) {
			t.Errorf("pod %s: want %q in:\n%s", PodIfName, want, addrs)
		}
	}
	if r := ipIn(pod.NetNS, "-4", "route", "show", "default"); !strings.Contains(r, "via 10.77.0.1 dev eth0") {
		t.Errorf("pod default route: %s", r)
	}
	peer := ipIn(pod.PeerNetNS, "-4", "addr", "show", "dev", PeerIfName)
	for _, want := range []string{"10.77.0.1/24", "169.254.7.127/32", "10.77.9.9/32"} {
		if !strings.Contains(peer, want) {
			t.Errorf("peer: want %s in:\n%s", want, peer)
		}
	}
	// Reachability is exercised by the standin and equiv tests, which run real traffic.
	// A second pod of the same run coexists with the first.
	pod2, err := run.NewPod()
	if err != nil {
		t.Fatal(err)
	}
	if pod2.NetNS == pod.NetNS || pod2.PodCgroup == pod.PodCgroup {
		t.Fatalf("pods share names: %+v %+v", pod, pod2)
	}
	if err := run.Close(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{pod.NetNSPath(), pod.PeerNetNSPath(), pod2.NetNSPath(), pod.PodCgroup, run.CgroupDir, run.BPFFS, run.Dir} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s survived Close (err=%v)", p, err)
		}
	}
}

// A run whose owner died (its lock released, nothing cleaned) is swept by the next
// run; a live run is not.
func TestSweepStaleRemovesDeadRunsOnly(t *testing.T) {
	privtest.Require(t)
	live, err := NewRun()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = live.Close() })
	livePod, err := live.NewPod()
	if err != nil {
		t.Fatal(err)
	}
	dead, err := NewRun()
	if err != nil {
		t.Fatal(err)
	}
	deadPod, err := dead.NewPod()
	if err != nil {
		t.Fatal(err)
	}
	// Die: drop the lock and forget to clean up.
	dead.lock.Close()
	dead.lock = nil
	if err := SweepStale(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{deadPod.NetNSPath(), deadPod.PeerNetNSPath(), deadPod.PodCgroup, dead.CgroupDir, dead.BPFFS, dead.Dir} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s survived the sweep (err=%v)", p, err)
		}
	}
	for _, p := range []string{livePod.NetNSPath(), livePod.PodCgroup, live.BPFFS} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("the live run lost %s: %v", p, err)
		}
	}
	dead.closed = true // already swept
}
