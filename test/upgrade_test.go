package test

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/redirect"
)

// Upgrades to other builds than the embedded one: the builds are the embedded
// object changed by a spec hook (a test seam of internal/datapath), run
// in-process through internal/redirect, against pods attached by the product
// CLI with traffic flowing.

// addedMap is the map the newer build adds.
const addedMap = "erd_test_added"

func newerBuild(hook datapath.SpecHook) redirect.Options {
	return redirect.Options{Config: config.Default(), Datapath: datapath.Options{Hook: hook, Schema: datapath.Schema + 1}}
}

func addAMap(spec *ebpf.CollectionSpec) error {
	spec.Maps[addedMap] = &ebpf.MapSpec{Name: addedMap, Type: ebpf.Hash, KeySize: 8, ValueSize: 8, MaxEntries: 16}
	return nil
}

func widenPodsValue(spec *ebpf.CollectionSpec) error {
	spec.Maps["pods"].ValueSize += 8
	return nil
}

// An upgrade to a build that adds a map, and moves the schema on: no
// connection fails, every link runs the new programs, the new map is pinned,
// the new build reopens what it pinned, and the product, now the older
// binary, refuses the store clearly and swaps nothing.
func TestUpgradeToABuildThatAddsAMap(t *testing.T) {
	r := lifecycleRun(t)
	lp := newLivePod(t, r)
	if res := runCLI(t, nil, attachArgs(r, lp.pod)...); res.code != 0 {
		t.Fatalf("attach: %s", res.output)
	}
	newer := newerBuild(addAMap)
	newer.Root = r.BPFFS
	t.Cleanup(func() {
		if err := redirect.Detach(context.Background(), newer, lp.pod.ID); err != nil {
			t.Errorf("detach with the newer build: %v", err)
		}
	})
	before := ourLinks(t, r.BPFFS)
	stop := make(chan struct{})
	l := startLoop(lp, stop)
	l.progress(t, 4)
	rep, err := redirect.Upgrade(context.Background(), newer, false)
	if err != nil {
		t.Fatal(err)
	}
	l.progress(t, 4)
	close(stop)
	<-l.done
	if l.failed.Load() != 0 {
		t.Fatalf("%d of %d connections failed across the upgrade; first: %v", l.failed.Load(), l.ok.Load()+l.failed.Load(), l.firstErr.Load())
	}
	after := ourLinks(t, r.BPFFS)
	if len(after) != len(before) || rep.Links != len(before) {
		t.Fatalf("links: %d before, %d after, %d updated", len(before), len(after), rep.Links)
	}
	for id, prog := range after {
		if before[id] == prog {
			t.Errorf("link %d still runs program %d", id, prog)
		}
	}
	if _, err := os.Stat(filepath.Join(r.BPFFS, "dp", "maps", addedMap)); err != nil {
		t.Fatalf("the added map is not pinned: %v", err)
	}
	sts, err := redirect.List(newer)
	if err != nil || len(sts) != 1 || sts[0].Health != redirect.StateHealthy {
		t.Fatalf("the newer build lists %+v, %v", sts, err)
	}

	// The product is the older binary now: every command is refused.
	other := newPod(t, r)
	for _, args := range [][]string{
		{"list", "--bpffs", r.BPFFS},
		{"upgrade", "--force", "--bpffs", r.BPFFS},
		attachArgs(r, other),
		{"detach", "--pod-id", lp.pod.ID, "--bpffs", r.BPFFS},
	} {
		res := runCLI(t, nil, args...)
		if res.code == 0 || !strings.Contains(res.output, "pinned by a newer ebpf-redirect") {
			t.Errorf("%v on a newer store: %d %s", args[0], res.code, res.output)
		}
	}
	if now := ourLinks(t, r.BPFFS); !maps.Equal(now, after) {
		t.Fatalf("the older binary changed the links: %v, were %v", now, after)
	}
	if st := inspectPod(t, r, other); len(st.pins) != 0 {
		t.Fatalf("the refused attach left pins: %v", st.pins)
	}
}

// An upgrade to a build that changes a map's layout is refused with an error
// naming the map; nothing changes (pins, links, traffic).
func TestUpgradeToAChangedLayoutIsRefused(t *testing.T) {
	r := lifecycleRun(t)
	lp := newLivePod(t, r)
	if res := runCLI(t, nil, attachArgs(r, lp.pod)...); res.code != 0 {
		t.Fatalf("attach: %s", res.output)
	}
	t.Cleanup(func() { runCLI(t, nil, "detach", "--pod-id", lp.pod.ID, "--bpffs", r.BPFFS) })
	linksBefore := ourLinks(t, r.BPFFS)
	pinsBefore := pinsUnder(t, r.BPFFS)
	stop := make(chan struct{})
	l := startLoop(lp, stop)
	l.progress(t, 4)
	o := newerBuild(widenPodsValue)
	o.Root = r.BPFFS
	_, err := redirect.Upgrade(context.Background(), o, true)
	if !errors.Is(err, datapath.ErrLayoutChanged) || !strings.Contains(err.Error(), "pods: value size") || !strings.Contains(err.Error(), "nothing was changed") {
		t.Fatalf("upgrade to a changed layout: %v", err)
	}
	l.progress(t, 4)
	close(stop)
	<-l.done
	if l.failed.Load() != 0 {
		t.Fatalf("%d connections failed; first: %v", l.failed.Load(), l.firstErr.Load())
	}
	if now := ourLinks(t, r.BPFFS); !maps.Equal(now, linksBefore) {
		t.Fatalf("links changed: %v, were %v", now, linksBefore)
	}
	if now := pinsUnder(t, r.BPFFS); strings.Join(now, ",") != strings.Join(pinsBefore, ",") {
		t.Fatalf("pins changed: %v, were %v", now, pinsBefore)
	}
	if res := runCLI(t, nil, "list", "--bpffs", r.BPFFS); res.code != 0 || !strings.Contains(res.output, "healthy") {
		t.Fatalf("after the refused upgrade: %s", res.output)
	}
}
