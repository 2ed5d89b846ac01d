package datapath

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"

	"github.com/cilium/ebpf"
)

// Schema is the version of what a node pins: the maps' layouts, the pin
// directory and the pod records. It changes when any of them does; programs
// can change within a schema (Version tells them apart). A binary works only
// on a store of its own schema; `upgrade` moves an older one forward.
const Schema = 1

// Options are test seams of a load: a build that differs from the embedded
// one. The product never sets them.
type Options struct {
	// Hook changes the object before it is loaded.
	Hook SpecHook
	// Schema is pinned instead of the package's Schema, when not zero.
	Schema int
}

func (o Options) schema() int {
	if o.Schema != 0 {
		return o.Schema
	}
	return Schema
}

// Errors of a store of another schema, to test with errors.Is.
var (
	// ErrUpgradeNeeded: the pins are of an older schema; `upgrade` moves them on.
	ErrUpgradeNeeded = errors.New("pinned by an older ebpf-redirect: run `ebpf-redirect upgrade`")
	// ErrNewerSchema: the pins are of a newer schema than this binary knows.
	ErrNewerSchema = errors.New("pinned by a newer ebpf-redirect; use that version (this one cannot read its pins)")
	// ErrNoSchema: pins of a version from before schemas were recorded.
	ErrNoSchema = errors.New("pinned by an ebpf-redirect from before schema versions, which cannot be upgraded in place; detach its pods with the binary that attached them")
)

// metaInfo is the content of the meta pin: JSON, so that any later version
// can read at least the schema.
type metaInfo struct {
	Schema  int    `json:"schema"`
	Version string `json:"version"`
}

const metaSize = 512

func newMeta() (*ebpf.Map, error) {
	return ebpf.NewMap(&ebpf.MapSpec{Name: "erd_meta", Type: ebpf.Array, KeySize: 4, ValueSize: metaSize, MaxEntries: 1})
}

func (d *Datapath) writeMeta() error {
	b, err := json.Marshal(metaInfo{Schema: d.schema, Version: d.version})
	if err != nil {
		return err
	}
	v := make([]byte, metaSize)
	copy(v, b)
	return d.Meta.Put(uint32(0), v)
}

// readMeta reads the schema and version a datapath was pinned with.
func readMeta(dir string) (metaInfo, error) {
	var mi metaInfo
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, metaPin), nil)
	if errors.Is(err, os.ErrNotExist) {
		if _, serr := os.Stat(dir); serr == nil {
			return mi, fmt.Errorf("%s: %w", dir, ErrNoSchema)
		}
		return mi, fmt.Errorf("no datapath pinned in %s: %w", dir, os.ErrNotExist)
	}
	if err != nil {
		return mi, fmt.Errorf("opening %s: %w", filepath.Join(dir, metaPin), err)
	}
	defer m.Close()
	var v []byte
	if err := m.Lookup(uint32(0), &v); err != nil {
		return mi, fmt.Errorf("reading %s: %w", filepath.Join(dir, metaPin), err)
	}
	if err := json.Unmarshal(bytes.TrimRight(v, "\x00"), &mi); err != nil {
		return mi, fmt.Errorf("%s: unreadable meta: %w", dir, err)
	}
	return mi, nil
}

// check refuses pins of another schema than ours.
func (m metaInfo) check(dir string, ours int) error {
	switch {
	case m.Schema < ours:
		return fmt.Errorf("%s: schema %d, this binary's is %d: %w", dir, m.Schema, ours, ErrUpgradeNeeded)
	case m.Schema > ours:
		return fmt.Errorf("%s: schema %d, this binary knows %d: %w", dir, m.Schema, ours, ErrNewerSchema)
	}
	return nil
}

// CheckSchema refuses a datapath pinned in dir with another schema than this
// binary's; nothing pinned is fine.
func CheckSchema(dir string, o Options) error {
	m, err := readMeta(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	return m.check(dir, o.schema())
}

// PinnedVersion is the Version of the programs pinned in dir.
func PinnedVersion(dir string) (string, error) {
	m, err := readMeta(dir)
	return m.Version, err
}

// eachField calls fn for every field of the struct s points to that is of
// type T, with its `ebpf` tag: the generated structs are the list of objects.
func eachField[T any](s any, fn func(name string, v T)) {
	rv := reflect.ValueOf(s).Elem()
	for i := 0; i < rv.NumField(); i++ {
		name := rv.Type().Field(i).Tag.Get("ebpf")
		if v, ok := rv.Field(i).Interface().(T); ok && name != "" {
			fn(name, v)
		}
	}
}
