package datapath

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
)

// pinnedFixture pins a datapath (with one pod entry) on a fresh bpffs.
func pinnedFixture(t *testing.T) (dir string, cfg config.Config) {
	requireBPF(t)
	root := t.TempDir()
	if err := unix.Mount("bpf", root, "bpf", 0, ""); err != nil {
		t.Skipf("cannot mount bpffs (needs CAP_SYS_ADMIN): %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(root, unix.MNT_DETACH) })
	cfg = config.Default()
	cfg.MaxFlows = 1024 // an upgrade keeps the node's sizes
	dp, err := Load(cfg, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	if err := dp.Pods.Put(uint64(42), PodInfo{Ip4: 7}); err != nil {
		t.Fatal(err)
	}
	dir = filepath.Join(root, "dp")
	if err := dp.Pin(dir); err != nil {
		t.Fatal(err)
	}
	return dir, cfg
}

// pins lists the files under dir and the ids of what they hold.
func pins(t *testing.T, dir string) map[string]uint32 {
	out := map[string]uint32{}
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		var fs unix.Stat_t
		_ = unix.Stat(p, &fs)
		out[strings.TrimPrefix(p, dir)] = uint32(fs.Ino)
		return nil
	})
	return out
}

func addMap(spec *ebpf.CollectionSpec) error {
	spec.Maps["erd_test_added"] = &ebpf.MapSpec{Name: "erd_test_added", Type: ebpf.Hash, KeySize: 8, ValueSize: 8, MaxEntries: 16}
	return nil
}

func widenPods(spec *ebpf.CollectionSpec) error {
	spec.Maps[redirectMapPods].ValueSize += 8
	return nil
}

// A new build that adds a map: the pinned maps (entries, sizes) carry over,
// the new one is created and pinned, the programs and the schema move on.
func TestUpgradeAddsAMap(t *testing.T) {
	dir, cfg := pinnedFixture(t)
	o := Options{Hook: addMap, Schema: Schema + 1}
	nd, err := PrepareUpgrade(dir, cfg, o)
	if err != nil {
		t.Fatal(err)
	}
	defer nd.Close()
	var v PodInfo
	if err := nd.Pods.Lookup(uint64(42), &v); err != nil || v.Ip4 != 7 {
		t.Fatalf("the pods map did not carry over: %+v %v", v, err)
	}
	if n := nd.OutFlows.MaxEntries(); n != 1024 {
		t.Fatalf("out_flows has %d entries, the pinned one 1024", n)
	}
	if err := nd.Commit(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, mapsDir, "erd_test_added")); err != nil {
		t.Fatalf("the added map is not pinned: %v", err)
	}
	if _, err := Open(dir, nil, Options{}); !errors.Is(err, ErrNewerSchema) {
		t.Fatalf("this schema's binary opened the upgraded store: %v", err)
	}
	again, err := Open(dir, &cfg, o)
	if err != nil {
		t.Fatalf("the new build cannot open what it pinned: %v", err)
	}
	again.Close()
}

// A new build that changes a map's value size is refused before anything is
// touched: the pins are the same files, the schema the old one.
func TestUpgradeRefusesAChangedLayout(t *testing.T) {
	dir, cfg := pinnedFixture(t)
	before := pins(t, dir)
	_, err := PrepareUpgrade(dir, cfg, Options{Hook: widenPods, Schema: Schema + 1})
	if !errors.Is(err, ErrLayoutChanged) || !strings.Contains(err.Error(), "pods: value size 48, pinned 40") {
		t.Fatalf("PrepareUpgrade: %v", err)
	}
	if after := pins(t, dir); !mapsEqual(before, after) {
		t.Fatalf("pins changed: %v, before %v", after, before)
	}
	if err := CheckSchema(dir, Options{}); err != nil {
		t.Fatalf("the store is no longer of this schema: %v", err)
	}
}

// An upgrade keeps the node's config, and never goes back to an older schema.
func TestUpgradeRefusesOtherConfigAndOlderBinaries(t *testing.T) {
	dir, cfg := pinnedFixture(t)
	other := cfg
	other.InboundPort = 16006
	if _, err := PrepareUpgrade(dir, other, Options{}); err == nil || !strings.Contains(err.Error(), "inbound port") {
		t.Errorf("an upgrade with another config: %v", err)
	}
	nd, err := PrepareUpgrade(dir, cfg, Options{Schema: Schema + 1})
	if err != nil {
		t.Fatal(err)
	}
	err = nd.Commit(dir)
	nd.Close()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := PrepareUpgrade(dir, cfg, Options{}); !errors.Is(err, ErrNewerSchema) {
		t.Errorf("a binary of an older schema upgraded a newer store: %v", err)
	}
}

func mapsEqual(a, b map[string]uint32) bool {
	ka, kb := keys(a), keys(b)
	if !slices.Equal(ka, kb) {
		return false
	}
	for k := range a {
		if a[k] != b[k] {
			return false
		}
	}
	return true
}

func keys(m map[string]uint32) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
