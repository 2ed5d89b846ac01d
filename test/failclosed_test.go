package test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/equiv"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
)

// Fail closed: whatever state the datapath lacks, a connection it should
// capture fails; it never reaches its destination unproxied.

// pinnedMap opens one of the datapath's maps under a run's bpffs.
func pinnedMap(t *testing.T, bpffs, name string) *ebpf.Map {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(bpffs, "dp", "maps", name), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// A full pods map (shrunk to one entry): the second pod's attach is refused
// with an error naming the map, leaves nothing behind, and the first pod
// keeps working.
func TestFullPodMapRefusesAttach(t *testing.T) {
	r := lifecycleRun(t)
	sized := []string{"--max-pods", "1"}
	first, second := newPod(t, r), newPod(t, r)
	if res := runCLI(t, nil, append(attachArgs(r, first), sized...)...); res.code != 0 {
		t.Fatalf("attach failed: %s", res.output)
	}
	t.Cleanup(func() { runCLI(t, nil, "detach", "--pod-id", first.ID, "--bpffs", r.BPFFS) })
	firstBefore := inspectPod(t, r, first)
	before := inspectPod(t, r, second)
	res := runCLI(t, nil, append(attachArgs(r, second), sized...)...)
	if res.code == 0 || !strings.Contains(res.output, "pod map") {
		t.Fatalf("want the full pod map named, got %d: %s", res.code, res.output)
	}
	if after := inspectPod(t, r, second); !equalState(after, before) {
		t.Fatalf("refused attach left state: %+v, before %+v", after, before)
	}
	if now := inspectPod(t, r, first); !equalState(now, firstBefore) {
		t.Fatalf("attached pod changed: %+v, was %+v", now, firstBefore)
	}
}

// The pod's state in the maps disappears while it stays attached (a bug, an
// operator, a restart gone wrong): its programs then refuse what they would
// have redirected.
func TestMissingStateFailsClosed(t *testing.T) {
	rig := newLoadRig(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pods := pinnedMap(t, rig.run.BPFFS, "pods")
	ifaces := pinnedMap(t, rig.run.BPFFS, "ifaces")

	dial := func(a *standin.Agent, dst string) standin.DialResult {
		t.Helper()
		res, err := a.Dial(ctx, standin.DialSpec{Proto: "tcp", Dst: dst, Token: "fail-closed", TimeoutMS: 1000})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	reached := func() int {
		t.Helper()
		e := newEvents()
		if err := rig.settle(ctx, e); err != nil {
			t.Fatal(err)
		}
		px, _ := e.proxies(rig)
		return sum(e.counts[rig.app]) + sum(e.counts[rig.peer]) + sum(px)
	}
	// Working, first.
	if res := dial(rig.app, rig.outDsts[0]); res.Outcome != standin.OutcomeOK {
		t.Fatalf("before: outbound %+v", res)
	}
	if res := dial(rig.peer, rig.inDsts[0]); res.Outcome != standin.OutcomeOK {
		t.Fatalf("before: inbound %+v", res)
	}
	reached()

	t.Run("no pod entry: outbound connect refused", func(t *testing.T) {
		var pi datapath.PodInfo
		if err := pods.Lookup(rig.cookie, &pi); err != nil {
			t.Fatal(err)
		}
		if err := pods.Delete(rig.cookie); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := pods.Put(rig.cookie, pi); err != nil {
				t.Fatal(err)
			}
		}()
		for _, dst := range []string{rig.outDsts[0], rig.outDsts6[0]} {
			res := dial(rig.app, dst)
			if res.Outcome != standin.OutcomeErrPrefix+"EPERM" {
				t.Errorf("outbound to %s without the pod's state: %+v, want EPERM", dst, res)
			}
		}
		if n := reached(); n != 0 {
			t.Errorf("%d parties saw the connections", n)
		}
	})
	t.Run("no interface entry: inbound SYN dropped", func(t *testing.T) {
		var keys []datapath.IfaceKey
		var vals []datapath.IfaceInfo
		var k datapath.IfaceKey
		var v datapath.IfaceInfo
		it := ifaces.Iterate()
		for it.Next(&k, &v) {
			if k.Netns == rig.cookie {
				keys, vals = append(keys, k), append(vals, v)
			}
		}
		if len(keys) == 0 {
			t.Fatal("the pod has no interface entry")
		}
		for _, k := range keys {
			if err := ifaces.Delete(k); err != nil {
				t.Fatal(err)
			}
		}
		defer func() {
			for i, k := range keys {
				if err := ifaces.Put(k, vals[i]); err != nil {
					t.Fatal(err)
				}
			}
		}()
		for _, dst := range []string{rig.inDsts[0], rig.inDsts6[0]} {
			res := dial(rig.peer, dst)
			if res.Outcome != standin.OutcomeTimeout {
				t.Errorf("inbound to %s without the interface's state: %+v, want a time-out (dropped)", dst, res)
			}
		}
		if n := reached(); n != 0 {
			t.Errorf("%d parties saw the connections", n)
		}
	})
	// And back: the state restored, it works again.
	for _, dst := range []string{rig.outDsts[0], rig.outDsts6[0]} {
		if res := dial(rig.app, dst); res.Outcome != standin.OutcomeOK {
			t.Fatalf("after: outbound to %s %+v", dst, res)
		}
	}
	for _, dst := range []string{rig.inDsts[0], rig.inDsts6[0]} {
		if res := dial(rig.peer, dst); res.Outcome != standin.OutcomeOK {
			t.Fatalf("after: inbound to %s %+v", dst, res)
		}
	}
}

// Detach with a redirected outbound connection open: the connection is the
// application's own socket to the proxy (nothing in the datapath carries it),
// so it completes through the proxy; the next connection goes straight out;
// nothing crashes. (Inbound, see the in-detach-while-open case: the
// connection breaks, as under iptables.) Under iptables-nft, whether an
// established redirected connection survives the rules' removal was seen to
// vary from run to run, so this is not a differential case.
func TestDetachKeepsOpenOutboundConnection(t *testing.T) {
	r := runner(t)
	c := equiv.Case{Name: "out-detach-while-open", Proxy: standin.ProxySpec{Outbound: true, Inbound: true, HBONE: true},
		Peer: []standin.ListenSpec{{Proto: "tcp", Addr: "0.0.0.0:80"}}, Client: equiv.ClientApp, RemoveWhileOpen: true,
		Dial: standin.DialSpec{Dst: "10.77.0.1:80", Size: 1000}}
	rec, err := r.RunCase(context.Background(), c, &equiv.Ebpf{Binary: ebpfBinary(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", rec)
	if rec.Client.Outcome != standin.OutcomeOK || rec.Client.Reply != "RESP peer:80 out-detach-while-open 1000 intact" {
		t.Errorf("the open connection did not complete intact: %+v", rec.Client)
	}
	if rec.After == nil || rec.After.Outcome != standin.OutcomeOK {
		t.Errorf("the connection after detach failed: %+v", rec.After)
	}
	if got := rec.Landing(); got != "proxy:15001>peer:80,peer:80" {
		t.Errorf("landed on %q: want the open one through the proxy, the next one direct", got)
	}
	if len(rec.StillOpen) != 0 {
		t.Errorf("connections left hanging: %v", rec.StillOpen)
	}
}
