package datapath

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
)

// MapSizesEnv names a hidden environment variable for tests: a list such as
// "out_flows=16,in_flows=16" that Load applies to the maps it creates, so that
// tests driving the CLI can fill a map and watch the datapath fail closed. It
// only affects a fresh load; a pinned datapath keeps the sizes it was made with.
const MapSizesEnv = "EBPF_REDIRECT_MAP_SIZES"

// MapSizes overrides the max entries of maps, by map name.
type MapSizes map[string]uint32

// maxMapSize bounds an override: these are test knobs, not a way to make the
// kernel allocate gigabytes.
const maxMapSize = 1 << 24

// resizable are the maps with a capacity (sk_orig is socket storage: it has
// one entry per socket and no max).
var resizable = []string{
	redirectMapPods, redirectMapLocalAddrs, redirectMapIfaces,
	redirectMapOutFlows, redirectMapInFlows, redirectMapCounters,
}

// ParseMapSizes reads "name=N,name=N". Empty means no override.
func ParseMapSizes(s string) (MapSizes, error) {
	out := MapSizes{}
	if strings.TrimSpace(s) == "" {
		return out, nil
	}
	for _, item := range strings.Split(s, ",") {
		name, val, ok := strings.Cut(strings.TrimSpace(item), "=")
		if !ok {
			return nil, fmt.Errorf("%q: want name=entries", item)
		}
		n, err := strconv.ParseUint(val, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("%q: entries: %w", item, err)
		}
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("map %s given twice", name)
		}
		out[name] = uint32(n)
	}
	return out, out.validate()
}

func (m MapSizes) validate() error {
	for name, n := range m {
		if !slices.Contains(resizable, name) {
			return fmt.Errorf("no resizable map %q (maps: %s)", name, strings.Join(resizable, ", "))
		}
		if n == 0 || n > maxMapSize {
			return fmt.Errorf("map %s: %d entries, want 1-%d", name, n, maxMapSize)
		}
	}
	return nil
}

func (m MapSizes) apply(spec *ebpf.CollectionSpec) error {
	if err := m.validate(); err != nil {
		return err
	}
	for name, n := range m {
		ms, ok := spec.Maps[name]
		if !ok {
			return fmt.Errorf("map %s is not in the object", name)
		}
		ms.MaxEntries = n
	}
	return nil
}
