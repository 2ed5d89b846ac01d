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
	"slices"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
)

// Rule identifies which rule of the reference decided a connection.
type Rule = redirectRule

// The rules, as the C code numbers them (generated from bpf/redirect.h).
const (
	RuleNone            = redirectRuleRULE_NONE
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
	PodInfo      = redirectPodInfo
	LocalKey     = redirectLocalKey
	IfaceKey     = redirectIfaceKey
	IfaceInfo    = redirectIfaceInfo
	FlowKey      = redirectFlowKey
	OrigDst      = redirectOrigDst
	InFlow       = redirectInFlow
	CounterKey   = redirectCounterKey
	ExplainQuery = redirectExplainQuery
	cConfig      = redirectConfig
)

// Datapath is one loaded set of programs and maps, shared by every pod. Its
// programs and maps are the generated bpf2go objects: nothing here lists them.
type Datapath struct {
	redirectPrograms
	redirectMaps
	// Rodata holds the load-time constants (the node's config).
	Rodata *ebpf.Map
	// Meta holds the schema and version the datapath was pinned with.
	Meta *ebpf.Map
	// made are the maps this load created (not taken over from pins): an
	// upgrade pins them when it commits.
	made map[string]*ebpf.Map
	// extra are maps of the object outside the generated structs.
	extra []*ebpf.Map
	// schema and version are what Pin and Commit record.
	schema  int
	version string
}

// Version identifies the embedded programs: a hash of the compiled object.
func Version() string {
	h := sha256.Sum256(_RedirectBytes)
	return hex.EncodeToString(h[:8])
}

// Addr is an address as the maps hold it: 16 bytes in network order, an IPv4
// address IPv4-mapped (a zone is dropped).
func Addr(a netip.Addr) [4]uint32 {
	var out [4]uint32
	if !a.IsValid() {
		return out
	}
	b := a.As16()
	for i := range out {
		out[i] = binary.NativeEndian.Uint32(b[4*i:]) // network order in memory
	}
	return out
}

// AddrOf reads an address of the maps back; an IPv4-mapped one as IPv4.
func AddrOf(v [4]uint32) netip.Addr {
	var b [16]byte
	for i, w := range v {
		binary.NativeEndian.PutUint32(b[4*i:], w)
	}
	return netip.AddrFrom16(b).Unmap()
}

// IP4 is an IPv4 address as a network-order word.
func IP4(a netip.Addr) uint32 {
	if !a.Is4() {
		return 0
	}
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func toC(c config.Config) cConfig {
	var v6 uint8
	if c.IPv6 {
		v6 = 1
	}
	return cConfig{
		ProbeAddr:    IP4(c.ProbeAddr),
		ProbeAddr6:   Addr(c.ProbeAddr6),
		Ipv6:         v6,
		ProxyMark:    c.ProxyMark,
		ConnMark:     c.ConnMark,
		MarkMask:     c.MarkMask,
		OutboundPort: c.OutboundPort,
		InboundPort:  c.InboundPort,
		HbonePort:    c.HBONEPort,
		RouteTable:   uint32(c.RouteTable),
		RulePriority: uint32(c.RulePriority),
	}
}

// mapSizes is the capacity of each shared map for a config; maps not named
// keep the size they are compiled with (sk_orig is socket storage and has
// none).
func mapSizes(c config.Config) map[string]uint32 {
	return map[string]uint32{
		redirectMapPods:       c.MaxPods,
		redirectMapLocalAddrs: c.MaxPods * 16, // both families' addresses
		redirectMapIfaces:     c.MaxPods * 4,
		redirectMapCounters:   c.MaxPods * uint32(RuleMax) * 2, // per family
		redirectMapOutFlows:   c.MaxFlows,
		redirectMapInFlows:    c.MaxFlows,
	}
}

// SpecHook changes the object before it is loaded: a test seam, to load a
// build that differs from the embedded one (an added map, a changed layout).
type SpecHook func(*ebpf.CollectionSpec) error

// Spec returns the programs with cfg (which must be valid) written into their
// constants and the maps sized for it.
func Spec(cfg config.Config, hook SpecHook) (*ebpf.CollectionSpec, error) {
	spec, err := loadRedirect()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables[redirectVarCfg].Set(toC(cfg)); err != nil {
		return nil, fmt.Errorf("writing config constants: %w", err)
	}
	for name, n := range mapSizes(cfg) {
		spec.Maps[name].MaxEntries = n
	}
	if hook != nil {
		if err := hook(spec); err != nil {
			return nil, err
		}
	}
	return spec, nil
}

// isData tells the maps the loader makes of the object's global data
// (.rodata...) from the maps the C code declares.
func isData(name string) bool { return strings.HasPrefix(name, ".") }

// Load loads the programs into the kernel, unpinned. A verifier rejection is
// returned with the verifier's full log.
func Load(cfg config.Config, o Options) (*Datapath, error) {
	return load(cfg, o, nil)
}

func load(cfg config.Config, o Options, replace map[string]*ebpf.Map) (*Datapath, error) {
	if err := CheckKernel(); err != nil {
		return nil, err
	}
	spec, err := Spec(cfg, o.Hook)
	if err != nil {
		return nil, err
	}
	for name, m := range replace {
		spec.Maps[name].MaxEntries = m.MaxEntries() // a pinned map keeps its size
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: replace})
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("the kernel's verifier rejected a program: %+v", ve)
		}
		return nil, fmt.Errorf("loading eBPF programs: %w", err)
	}
	defer coll.Close()
	d := &Datapath{Rodata: coll.DetachMap(".rodata"), made: map[string]*ebpf.Map{}, schema: o.schema(), version: Version()}
	for name, m := range coll.Maps {
		if _, taken := replace[name]; !taken && !isData(name) {
			d.made[name] = m
		}
	}
	if d.Meta, err = newMeta(); err == nil {
		err = assign(coll, d)
	}
	// Maps of the object the generated structs do not know (a test build's
	// additions) stay with the datapath, to be pinned and closed with it.
	for name := range coll.Maps {
		if !isData(name) {
			d.extra = append(d.extra, coll.DetachMap(name))
		}
	}
	if err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// assign moves the collection's programs and maps into the generated structs.
func assign(coll *ebpf.Collection, d *Datapath) error {
	if err := coll.Assign(&d.redirectPrograms); err != nil {
		return err
	}
	return coll.Assign(&d.redirectMaps)
}

// Layout of a pinned datapath directory.
const (
	progsDir  = "progs" // progs/<name>: every program of the object
	mapsDir   = "maps"  // maps/<name>: every map the C code declares
	rodataPin = "rodata"
	metaPin   = "meta"
)

// specNames lists the object's programs and declared maps.
func specNames() (progs, maps []string, err error) {
	spec, err := loadRedirect()
	if err != nil {
		return nil, nil, err
	}
	for name := range spec.Programs {
		progs = append(progs, name)
	}
	for name := range spec.Maps {
		if !isData(name) {
			maps = append(maps, name)
		}
	}
	return progs, maps, nil
}

// Pin pins every program and map into dir, which must not exist yet. The pins
// are made in a sibling directory and renamed into place, so dir is either
// complete or absent, even if the process dies half way.
func (d *Datapath) Pin(dir string) error {
	// bpffs rejects names with a dot.
	tmp := fmt.Sprintf("%s_tmp_%d", dir, os.Getpid())
	_ = os.RemoveAll(tmp)
	err := d.pinAll(tmp, func(pin func(string) error, path string) error { return pin(path) })
	if err == nil {
		err = d.writeMeta()
	}
	if err == nil {
		err = os.Rename(tmp, dir)
	}
	if err != nil {
		d.unpinAll()
		_ = os.RemoveAll(tmp)
		return fmt.Errorf("pinning the datapath in %s: %w", dir, err)
	}
	return nil
}

// pinAll pins every object below dir through pin (a plain pin, or a pin
// that replaces an existing one).
func (d *Datapath) pinAll(dir string, pin func(func(string) error, string) error) error {
	for _, sub := range []string{progsDir, mapsDir} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return err
		}
	}
	progs, maps := d.objects()
	for name, p := range progs {
		if err := pin(p.Pin, filepath.Join(dir, progsDir, name)); err != nil {
			return fmt.Errorf("program %s: %w", name, err)
		}
	}
	for name, m := range d.made {
		if _, known := maps[name]; !known {
			maps[name] = m // a test build's addition
		}
	}
	for name, m := range maps {
		if err := pin(m.Pin, filepath.Join(dir, mapsDir, name)); err != nil {
			return fmt.Errorf("map %s: %w", name, err)
		}
	}
	for name, m := range map[string]*ebpf.Map{rodataPin: d.Rodata, metaPin: d.Meta} {
		if err := pin(m.Pin, filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return nil
}

func (d *Datapath) unpinAll() {
	progs, maps := d.objects()
	for _, p := range progs {
		_ = p.Unpin()
	}
	for _, m := range maps {
		_ = m.Unpin()
	}
	_ = d.Rodata.Unpin()
	_ = d.Meta.Unpin()
}

// objects are the generated structs' programs and maps, by name in the
// object (reflection over the same tags Assign uses).
func (d *Datapath) objects() (map[string]*ebpf.Program, map[string]*ebpf.Map) {
	progs, maps := map[string]*ebpf.Program{}, map[string]*ebpf.Map{}
	eachField(&d.redirectPrograms, func(name string, p *ebpf.Program) { progs[name] = p })
	eachField(&d.redirectMaps, func(name string, m *ebpf.Map) { maps[name] = m })
	return progs, maps
}

// Objects are every program and map of the datapath (the constants and the
// meta included), for accounting.
func (d *Datapath) Objects() ([]*ebpf.Program, []*ebpf.Map) {
	progs, maps := d.objects()
	var ps []*ebpf.Program
	var ms []*ebpf.Map
	for _, p := range progs {
		ps = append(ps, p)
	}
	for _, m := range maps {
		ms = append(ms, m)
	}
	return ps, append(ms, d.Rodata, d.Meta)
}

// PinnedVersion is the Version of the programs this datapath runs.
func (d *Datapath) PinnedVersion() string { return d.version }

// ProgramsByName are the programs, by their names in the object.
func (d *Datapath) ProgramsByName() map[string]*ebpf.Program {
	progs, _ := d.objects()
	return progs
}

// Open opens a datapath pinned by Pin. It refuses a datapath of another
// schema (see CheckSchema) and, if cfg is not nil, one loaded with another
// config.
func Open(dir string, cfg *config.Config, o Options) (*Datapath, error) {
	meta, err := readMeta(dir)
	if err != nil {
		return nil, err
	}
	if err := meta.check(dir, o.schema()); err != nil {
		return nil, err
	}
	progNames, mapNames, err := specNames()
	if err != nil {
		return nil, err
	}
	coll := &ebpf.Collection{Programs: map[string]*ebpf.Program{}, Maps: map[string]*ebpf.Map{}}
	defer coll.Close()
	d := &Datapath{schema: meta.Schema, version: meta.Version}
	err = func() error {
		for _, name := range progNames {
			p, err := ebpf.LoadPinnedProgram(filepath.Join(dir, progsDir, name), nil)
			if err != nil {
				return err
			}
			coll.Programs[name] = p
		}
		for _, name := range mapNames {
			m, err := ebpf.LoadPinnedMap(filepath.Join(dir, mapsDir, name), nil)
			if err != nil {
				return err
			}
			coll.Maps[name] = m
		}
		if d.Rodata, err = ebpf.LoadPinnedMap(filepath.Join(dir, rodataPin), nil); err != nil {
			return err
		}
		if d.Meta, err = ebpf.LoadPinnedMap(filepath.Join(dir, metaPin), nil); err != nil {
			return err
		}
		return assign(coll, d)
	}()
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("opening the pinned datapath in %s: %w", dir, err)
	}
	if cfg == nil {
		return d, nil
	}
	if got, err := d.LiveConfig(); err != nil || got != *cfg {
		d.Close()
		if err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("the datapath pinned in %s was loaded with a different config (%s); detach every pod before changing it", dir, configDiff(got, *cfg))
	}
	return d, nil
}

// configDiff names the fields in which the pinned config differs from the
// requested one.
func configDiff(pinned, want config.Config) string {
	var out []string
	add := func(name string, a, b any) {
		if a != b {
			out = append(out, fmt.Sprintf("%s %v, not %v", name, a, b))
		}
	}
	add("outbound port", pinned.OutboundPort, want.OutboundPort)
	add("inbound port", pinned.InboundPort, want.InboundPort)
	add("hbone port", pinned.HBONEPort, want.HBONEPort)
	add("probe address", pinned.ProbeAddr, want.ProbeAddr)
	add("IPv6 probe address", pinned.ProbeAddr6, want.ProbeAddr6)
	add("IPv6 capture", pinned.IPv6, want.IPv6)
	add("proxy mark", fmt.Sprintf("%#x", pinned.ProxyMark), fmt.Sprintf("%#x", want.ProxyMark))
	add("connection mark", fmt.Sprintf("%#x", pinned.ConnMark), fmt.Sprintf("%#x", want.ConnMark))
	add("mark mask", fmt.Sprintf("%#x", pinned.MarkMask), fmt.Sprintf("%#x", want.MarkMask))
	add("route table", pinned.RouteTable, want.RouteTable)
	add("rule priority", pinned.RulePriority, want.RulePriority)
	add("max pods", pinned.MaxPods, want.MaxPods)
	add("max flows", pinned.MaxFlows, want.MaxFlows)
	return strings.Join(out, "; ")
}

// rawConfig reads back the constants the programs were loaded with.
func (d *Datapath) rawConfig() (cConfig, error) {
	var c cConfig
	var raw []byte
	if err := d.Rodata.Lookup(uint32(0), &raw); err != nil {
		return c, fmt.Errorf("reading the datapath's constants: %w", err)
	}
	// cfg sits at the offset the object's BTF gives it.
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

// LiveConfig is the config the pinned programs run with: their constants and
// the sizes of their maps.
func (d *Datapath) LiveConfig() (config.Config, error) {
	c, err := d.rawConfig()
	if err != nil {
		return config.Config{}, err
	}
	var a [4]byte
	binary.NativeEndian.PutUint32(a[:], c.ProbeAddr)
	return config.Config{
		OutboundPort: c.OutboundPort, InboundPort: c.InboundPort, HBONEPort: c.HbonePort,
		ProbeAddr: netip.AddrFrom4(a), ProbeAddr6: AddrOf(c.ProbeAddr6), IPv6: c.Ipv6 != 0,
		ProxyMark: c.ProxyMark, ConnMark: c.ConnMark, MarkMask: c.MarkMask,
		RouteTable: int(c.RouteTable), RulePriority: int(c.RulePriority),
		MaxPods: d.Pods.MaxEntries(), MaxFlows: d.OutFlows.MaxEntries(),
	}, nil
}

// Close releases this process's handles; pinned objects stay in the kernel.
func (d *Datapath) Close() {
	_ = d.redirectPrograms.Close()
	_ = d.redirectMaps.Close()
	for _, m := range append([]*ebpf.Map{d.Rodata, d.Meta}, d.extra...) {
		if m != nil {
			m.Close()
		}
	}
}

// Families the counters and explain tell apart: the two rulesets.
const (
	FamilyV4 uint8 = 4
	FamilyV6 uint8 = 6
)

// Families are both, in the order stats shows them.
var Families = []uint8{FamilyV4, FamilyV6}

// Count is a counter's key without the pod: a rule of a family's ruleset.
type Count struct {
	Rule   Rule
	Family uint8
}

// Counts sums the per-CPU counters of one pod, by rule and family.
func (d *Datapath) Counts(netns uint64) (map[Count]uint64, error) {
	out := map[Count]uint64{}
	for _, fam := range Families {
		for r := Rule(0); r < RuleMax; r++ {
			var per []uint64
			err := d.Counters.Lookup(CounterKey{Netns: netns, Rule: r, Family: fam}, &per)
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				continue
			}
			if err != nil {
				return nil, err
			}
			for _, v := range per {
				out[Count{r, fam}] += v
			}
		}
	}
	return out, nil
}

// Explain runs the programs' own rule functions on q (bpf/explain.c) and
// returns q with the answer filled in.
func (d *Datapath) Explain(q ExplainQuery) (ExplainQuery, error) {
	var out ExplainQuery
	if _, err := d.redirectPrograms.Explain.Run(&ebpf.RunOptions{Context: q, ContextOut: &out}); err != nil {
		return out, fmt.Errorf("running explain: %w", err)
	}
	return out, nil
}

// Hook is a program of the object and where it attaches.
type Hook struct {
	Name    string // the program's name, also the name of its link's pin
	Attach  ebpf.AttachType
	Program *ebpf.Program
}

// Where hooks attach: the pod's cgroup, the proxy's cgroup, tc on the pod's
// interfaces, or tc on the pod's lo.
const (
	ScopePod   = "pod"
	ScopeProxy = "proxy"
	ScopeTC    = "tc"
	ScopeLo    = "lo"
)

// Hooks are the programs attached at scope, from the object itself: a
// program's name says whose it is (pod_, proxy_; a tc program named pod_lo_
// goes on the pod's lo), its section where it attaches. So a new hook needs
// only its C function. Within one schema the set of programs does not change
// (see Schema).
func (d *Datapath) Hooks(scope string) ([]Hook, error) {
	hooks, err := HookSpecs(scope)
	if err != nil {
		return nil, err
	}
	progs, _ := d.objects()
	for i := range hooks {
		hooks[i].Program = progs[hooks[i].Name]
	}
	return hooks, nil
}

// HookSpecs are the hooks of scope, without their loaded programs: what a
// pod's links are named and where they attach.
func HookSpecs(scope string) ([]Hook, error) {
	spec, err := loadRedirect()
	if err != nil {
		return nil, err
	}
	var out []Hook
	for name, ps := range spec.Programs {
		owner, _, _ := strings.Cut(name, "_")
		s := owner
		if ps.Type == ebpf.SchedCLS {
			s = ScopeTC
			if strings.HasPrefix(name, "pod_lo_") {
				s = ScopeLo
			}
		}
		if s != scope || (owner != ScopePod && owner != ScopeProxy) {
			continue
		}
		out = append(out, Hook{Name: name, Attach: ps.AttachType})
	}
	slices.SortFunc(out, func(a, b Hook) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}
