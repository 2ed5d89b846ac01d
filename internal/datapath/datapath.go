package datapath

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
)

// Rule identifies which rule of the reference decided a connection.
type Rule = redirectRule

// The rules, as the C code numbers them (generated from bpf/redirect.h).
const (
	RuleOutProbe        = redirectRuleRULE_OUT_PROBE
	RuleOutConnMark     = redirectRuleRULE_OUT_CONNMARK
	RuleOutLocal        = redirectRuleRULE_OUT_LOCAL
	RuleOutRedirect     = redirectRuleRULE_OUT_REDIRECT
	RuleOutUntouched    = redirectRuleRULE_OUT_UNTOUCHED
	RuleInProbe         = redirectRuleRULE_IN_PROBE
	RuleInRedirect      = redirectRuleRULE_IN_REDIRECT
	RuleInUntouched     = redirectRuleRULE_IN_UNTOUCHED
	RuleConnMarkRestore = redirectRuleRULE_CONNMARK_RESTORE
	RuleFailClosed      = redirectRuleRULE_FAIL_CLOSED
	RuleMax             = redirectRuleRULE_MAX
)

// Map value and key types shared with the C code.
type (
	PodInfo    = redirectPodInfo
	LocalKey   = redirectLocalKey
	IfaceKey   = redirectIfaceKey
	IfaceInfo  = redirectIfaceInfo
	FlowKey    = redirectFlowKey
	OrigDst    = redirectOrigDst
	InFlow     = redirectInFlow
	CounterKey = redirectCounterKey
	cConfig    = redirectConfig
)

// Datapath is one loaded set of programs and maps, shared by every pod.
type Datapath struct {
	redirectPrograms
	redirectMaps
	// Rodata holds the load-time constants; kept so a later process can check
	// that the pinned programs were built for the config it was given.
	Rodata *ebpf.Map
	// VersionMap holds the Version of the programs that were pinned.
	VersionMap *ebpf.Map
}

// Version identifies the embedded programs: a hash of the compiled object. A
// pinned datapath with another version is upgraded in place (see
// LoadReplacing).
func Version() string {
	h := sha256.Sum256(_RedirectBytes)
	return hex.EncodeToString(h[:8])
}

func newVersionMap() (*ebpf.Map, error) {
	m, err := ebpf.NewMap(&ebpf.MapSpec{Name: "erd_version", Type: ebpf.Array, KeySize: 4, ValueSize: 32, MaxEntries: 1})
	if err != nil {
		return nil, err
	}
	v := make([]byte, 32)
	copy(v, Version())
	if err := m.Put(uint32(0), v); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// PinnedVersion is the Version of the programs this datapath was loaded from.
func (d *Datapath) PinnedVersion() (string, error) {
	v := make([]byte, 32)
	if err := d.VersionMap.Lookup(uint32(0), &v); err != nil {
		return "", fmt.Errorf("reading the datapath version: %w", err)
	}
	return string(bytes.TrimRight(v, "\x00")), nil
}

func toC(c config.Config) cConfig {
	a := c.ProbeAddr.As4()
	return cConfig{
		ProbeAddr:    binary.NativeEndian.Uint32(a[:]), // network order in memory
		ProxyMark:    c.ProxyMark,
		ConnMark:     c.ConnMark,
		MarkMask:     c.MarkMask,
		OutboundPort: c.OutboundPort,
		InboundPort:  c.InboundPort,
		HbonePort:    c.HBONEPort,
	}
}

// Spec returns the programs with cfg written into their constants.
func Spec(cfg config.Config) (*ebpf.CollectionSpec, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	spec, err := loadRedirect()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables[redirectVarCfg].Set(toC(cfg)); err != nil {
		return nil, fmt.Errorf("writing config constants: %w", err)
	}
	return spec, nil
}

// Load loads the programs into the kernel, unpinned. A verifier rejection is
// returned with the verifier's full log. Map sizes are the compiled ones,
// unless MapSizesEnv overrides some (tests shrink maps through the CLI so).
func Load(cfg config.Config) (*Datapath, error) {
	sizes, err := ParseMapSizes(os.Getenv(MapSizesEnv))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", MapSizesEnv, err)
	}
	return load(cfg, sizes, nil)
}

// LoadWithSizes is Load with the capacity of some maps changed (map name to
// max entries), to test what happens when a map is full.
func LoadWithSizes(cfg config.Config, sizes MapSizes) (*Datapath, error) {
	return load(cfg, sizes, nil)
}

// LoadReplacing loads the embedded programs on top of old's maps, so that an
// upgrade keeps every pod's state (flows, counters, addresses). It fails if
// the new programs' maps are not compatible with the pinned ones.
func LoadReplacing(cfg config.Config, old *Datapath) (*Datapath, error) {
	return load(cfg, nil, old)
}

func load(cfg config.Config, sizes MapSizes, old *Datapath) (*Datapath, error) {
	if err := CheckKernel(); err != nil {
		return nil, err
	}
	spec, err := Spec(cfg)
	if err != nil {
		return nil, err
	}
	if err := sizes.apply(spec); err != nil {
		return nil, err
	}
	var opts ebpf.CollectionOptions
	if old != nil {
		_, maps := old.objects()
		opts.MapReplacements = map[string]*ebpf.Map{}
		for name, m := range maps {
			if ms, ok := spec.Maps[name]; ok && m != nil {
				ms.MaxEntries = m.MaxEntries() // as loaded, even if resized
				opts.MapReplacements[name] = m
			}
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, opts)
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("the kernel's verifier rejected a program: %+v", ve)
		}
		return nil, fmt.Errorf("loading eBPF programs: %w", err)
	}
	d := &Datapath{Rodata: coll.DetachMap(".rodata")}
	err = coll.Assign(&d.redirectPrograms)
	if err == nil {
		err = coll.Assign(&d.redirectMaps)
	}
	if err == nil {
		d.VersionMap, err = newVersionMap()
	}
	coll.Close()
	if err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// objects names every program and map for pinning.
func (d *Datapath) objects() (map[string]*ebpf.Program, map[string]*ebpf.Map) {
	return map[string]*ebpf.Program{
			redirectProgPodConnect4:     d.PodConnect4,
			redirectProgPodGetpeername4: d.PodGetpeername4,
			redirectProgPodConnect6:     d.PodConnect6,
			redirectProgPodGetpeername6: d.PodGetpeername6,
			redirectProgPodSockops:      d.PodSockops,
			redirectProgPodIngress:      d.PodIngress,
			redirectProgPodEgress:       d.PodEgress,
			redirectProgPodSockIngress:  d.PodSockIngress,
			redirectProgProxyGetsockopt: d.ProxyGetsockopt,
		}, map[string]*ebpf.Map{
			redirectMapPods:       d.Pods,
			redirectMapLocalAddrs: d.LocalAddrs,
			redirectMapIfaces:     d.Ifaces,
			redirectMapSkOrig:     d.SkOrig,
			redirectMapOutFlows:   d.OutFlows,
			redirectMapInFlows:    d.InFlows,
			redirectMapCounters:   d.Counters,
			"rodata":              d.Rodata,
			"version":             d.VersionMap,
		}
}

// ProgramsByName are the programs, by their names in the object.
func (d *Datapath) ProgramsByName() map[string]*ebpf.Program {
	progs, _ := d.objects()
	return progs
}

// Repin replaces, in a datapath pinned in dir, the programs and the version
// and constants with this datapath's (after an upgrade: the maps are shared).
// Each pin is replaced by a rename, so a reader always finds a complete set.
func (d *Datapath) Repin(dir string) error {
	progs, maps := d.objects()
	repin := func(name string, pin func(string) error) error {
		final := filepath.Join(dir, name)
		tmp := filepath.Join(dir, "new_"+name)
		_ = os.Remove(tmp)
		if err := pin(tmp); err != nil {
			return err
		}
		return os.Rename(tmp, final)
	}
	for name, p := range progs {
		if err := repin("prog_"+name, p.Pin); err != nil {
			return fmt.Errorf("repinning %s: %w", name, err)
		}
	}
	for _, name := range []string{"rodata", "version"} {
		if err := repin("map_"+name, maps[name].Pin); err != nil {
			return fmt.Errorf("repinning %s: %w", name, err)
		}
	}
	return nil
}

// Pin pins every program and map into dir, which must not exist yet. The pins
// are made in a sibling directory and renamed into place, so dir is either
// complete or absent, even if the process dies half way.
func (d *Datapath) Pin(dir string) error {
	// bpffs rejects names with a dot.
	tmp := fmt.Sprintf("%s_tmp_%d", dir, os.Getpid())
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return err
	}
	progs, maps := d.objects()
	var err error
	for name, p := range progs {
		if err = p.Pin(filepath.Join(tmp, "prog_"+name)); err != nil {
			break
		}
	}
	for name, m := range maps {
		if err != nil {
			break
		}
		err = m.Pin(filepath.Join(tmp, "map_"+name))
	}
	if err == nil {
		err = os.Rename(tmp, dir)
	}
	if err != nil {
		// Unpinning leaves the objects loaded; the caller still holds them.
		for _, p := range progs {
			_ = p.Unpin()
		}
		for _, m := range maps {
			_ = m.Unpin()
		}
		_ = os.RemoveAll(tmp)
		return fmt.Errorf("pinning the datapath in %s: %w", dir, err)
	}
	return nil
}

// LoadPinned opens a datapath pinned by Pin and, if cfg is not nil, checks
// that it was loaded with cfg.
func LoadPinned(dir string, cfg *config.Config) (*Datapath, error) {
	d := &Datapath{}
	progs, maps := d.objects()
	out := &Datapath{}
	var err error
	load := func() error {
		for name := range progs {
			p, err := ebpf.LoadPinnedProgram(filepath.Join(dir, "prog_"+name), nil)
			if err != nil {
				return err
			}
			progs[name] = p
		}
		for name := range maps {
			m, err := ebpf.LoadPinnedMap(filepath.Join(dir, "map_"+name), nil)
			if err != nil {
				return err
			}
			maps[name] = m
		}
		return nil
	}
	err = load()
	out.PodConnect4, out.PodGetpeername4, out.PodSockops = progs[redirectProgPodConnect4], progs[redirectProgPodGetpeername4], progs[redirectProgPodSockops]
	out.PodConnect6, out.PodGetpeername6 = progs[redirectProgPodConnect6], progs[redirectProgPodGetpeername6]
	out.PodIngress, out.PodEgress, out.ProxyGetsockopt = progs[redirectProgPodIngress], progs[redirectProgPodEgress], progs[redirectProgProxyGetsockopt]
	out.PodSockIngress = progs[redirectProgPodSockIngress]
	out.Pods, out.LocalAddrs, out.Ifaces = maps[redirectMapPods], maps[redirectMapLocalAddrs], maps[redirectMapIfaces]
	out.SkOrig, out.OutFlows, out.InFlows, out.Counters = maps[redirectMapSkOrig], maps[redirectMapOutFlows], maps[redirectMapInFlows], maps[redirectMapCounters]
	out.Rodata, out.VersionMap = maps["rodata"], maps["version"]
	if err != nil {
		out.Close()
		return nil, fmt.Errorf("opening the pinned datapath in %s: %w", dir, err)
	}
	if cfg == nil {
		return out, nil
	}
	if got, err := out.Config(); err != nil || got != toC(*cfg) {
		out.Close()
		if err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("the datapath pinned in %s was loaded with a different config (%+v); detach every pod before changing it", dir, got)
	}
	return out, nil
}

// Config reads back the constants the programs were loaded with.
func (d *Datapath) Config() (cConfig, error) {
	var c cConfig
	var raw []byte
	if err := d.Rodata.Lookup(uint32(0), &raw); err != nil {
		return c, fmt.Errorf("reading the datapath's constants: %w", err)
	}
	// cfg is the first (and only) variable in .rodata of interest; it sits at
	// the offset the object's BTF gives it.
	spec, err := loadRedirect()
	if err != nil {
		return c, err
	}
	v := spec.Variables[redirectVarCfg]
	off, size := uint64(v.Offset), uint64(v.Size())
	if uint64(len(raw)) < off+size {
		return c, errors.New("the pinned constants are shorter than expected")
	}
	err = binary.Read(bytes.NewReader(raw[off:off+size]), binary.NativeEndian, &c)
	return c, err
}

// Close releases this process's handles; pinned objects stay in the kernel.
func (d *Datapath) Close() {
	progs, maps := d.objects()
	for _, p := range progs {
		if p != nil {
			p.Close()
		}
	}
	for _, m := range maps {
		if m != nil {
			m.Close()
		}
	}
}

// LiveConfig is the config the pinned programs run with (route table and
// rule priority are not the programs' business and stay at their defaults).
func (d *Datapath) LiveConfig() (config.Config, error) {
	c, err := d.Config()
	if err != nil {
		return config.Config{}, err
	}
	out := config.Default()
	var a [4]byte
	binary.NativeEndian.PutUint32(a[:], c.ProbeAddr)
	out.ProbeAddr = netip.AddrFrom4(a)
	out.ProxyMark, out.ConnMark, out.MarkMask = c.ProxyMark, c.ConnMark, c.MarkMask
	out.OutboundPort, out.InboundPort, out.HBONEPort = c.OutboundPort, c.InboundPort, c.HbonePort
	return out, nil
}

// Counts sums the per-CPU counters of one pod, by rule.
func (d *Datapath) Counts(netns uint64) (map[Rule]uint64, error) {
	out := map[Rule]uint64{}
	for r := Rule(0); r < RuleMax; r++ {
		var per []uint64
		err := d.Counters.Lookup(CounterKey{Netns: netns, Rule: r}, &per)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, v := range per {
			out[r] += v
		}
	}
	return out, nil
}
