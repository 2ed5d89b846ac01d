package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
)

// ErrLayoutChanged: the new programs would need a pinned map with another
// layout; the upgrade is refused and nothing is changed.
var ErrLayoutChanged = errors.New("the new programs change the layout of pinned maps")

// PrepareUpgrade loads this binary's programs on top of the maps pinned in
// dir: every pinned map whose layout (type, key and value size, flags) the
// new object shares is taken over with its entries and its size, a map the
// new object adds is created (and pinned by Commit). It changes nothing
// pinned: a changed layout, a newer schema, another config or a verifier
// rejection are refused before anything is touched. The caller swaps the
// programs into the links, then calls Commit.
func PrepareUpgrade(dir string, cfg config.Config, o Options) (*Datapath, error) {
	meta, err := readMeta(dir)
	if err != nil {
		return nil, err
	}
	if meta.Schema > o.schema() {
		return nil, fmt.Errorf("%s: schema %d, this binary knows %d: %w", dir, meta.Schema, o.schema(), ErrNewerSchema)
	}
	if meta.Schema == o.schema() {
		// Same layout: the node's config must be the one asked for (an
		// upgrade swaps programs, it does not reconfigure the node).
		if pinned, err := Open(dir, nil, o); err == nil {
			live, lerr := pinned.LiveConfig()
			pinned.Close()
			if lerr != nil {
				return nil, lerr
			}
			if live != cfg {
				return nil, fmt.Errorf("the datapath pinned in %s runs with another config (%s); pass the node's config to upgrade", dir, configDiff(live, cfg))
			}
		} else {
			return nil, err
		}
	}
	spec, err := Spec(cfg, o.Hook)
	if err != nil {
		return nil, err
	}
	replace := map[string]*ebpf.Map{}
	closeAll := func() {
		for _, m := range replace {
			m.Close()
		}
	}
	var changed []string
	for name, ms := range spec.Maps {
		if isData(name) {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, mapsDir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue // a map this version adds
		}
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("opening pinned map %s: %w", name, err)
		}
		if diff := layoutDiff(ms, m); diff != "" {
			changed = append(changed, name+": "+diff)
			m.Close()
			continue
		}
		replace[name] = m
	}
	if len(changed) > 0 {
		closeAll()
		return nil, fmt.Errorf("%w (%s); nothing was changed: detach every pod, or keep this node on the pinned version", ErrLayoutChanged, strings.Join(changed, "; "))
	}
	d, err := load(cfg, o, replace)
	closeAll() // the collection holds its own references
	return d, err
}

// layoutDiff says how a pinned map differs from the spec, ignoring its size
// (a node's capacity, which an upgrade keeps).
func layoutDiff(ms *ebpf.MapSpec, m *ebpf.Map) string {
	var d []string
	if ms.Type != m.Type() {
		d = append(d, fmt.Sprintf("type %s, pinned %s", ms.Type, m.Type()))
	}
	if ms.KeySize != m.KeySize() {
		d = append(d, fmt.Sprintf("key size %d, pinned %d", ms.KeySize, m.KeySize()))
	}
	if ms.ValueSize != m.ValueSize() {
		d = append(d, fmt.Sprintf("value size %d, pinned %d", ms.ValueSize, m.ValueSize()))
	}
	if ms.Flags != m.Flags() {
		d = append(d, fmt.Sprintf("flags %#x, pinned %#x", ms.Flags, m.Flags()))
	}
	return strings.Join(d, ", ")
}

// Commit makes a prepared upgrade the pinned datapath of dir: the maps it
// created are pinned, and every program, the constants and the meta replace
// their old pins by a rename (a reader always finds a complete pin). The meta
// goes last: until then the pinned schema and version are the old ones.
func (d *Datapath) Commit(dir string) error {
	for name, m := range d.made {
		if err := m.Pin(filepath.Join(dir, mapsDir, name)); err != nil {
			return fmt.Errorf("pinning new map %s: %w", name, err)
		}
	}
	d.made = map[string]*ebpf.Map{}
	progs, _ := d.objects()
	for name, p := range progs {
		if err := replacePin(p.Pin, filepath.Join(dir, progsDir, name)); err != nil {
			return fmt.Errorf("repinning program %s: %w", name, err)
		}
	}
	// Programs the new object no longer has.
	ents, _ := os.ReadDir(filepath.Join(dir, progsDir))
	for _, e := range ents {
		if _, ok := progs[e.Name()]; !ok {
			if err := os.Remove(filepath.Join(dir, progsDir, e.Name())); err != nil {
				return err
			}
		}
	}
	if err := replacePin(d.Rodata.Pin, filepath.Join(dir, rodataPin)); err != nil {
		return fmt.Errorf("repinning the constants: %w", err)
	}
	if err := d.writeMeta(); err != nil {
		return err
	}
	return replacePin(d.Meta.Pin, filepath.Join(dir, metaPin))
}

// replacePin pins beside path and renames over it.
func replacePin(pin func(string) error, path string) error {
	tmp := filepath.Join(filepath.Dir(path), "new_"+filepath.Base(path))
	_ = os.Remove(tmp)
	if err := pin(tmp); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
