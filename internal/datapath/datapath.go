package datapath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
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
	return LoadWithSizes(cfg, sizes)
}

// LoadWithSizes is Load with the capacity of some maps changed (map name to
// max entries), to test what happens when a map is full.
func LoadWithSizes(cfg config.Config, sizes MapSizes) (*Datapath, error) {
	spec, err := Spec(cfg)
	if err != nil {
		return nil, err
	}
	if err := sizes.apply(spec); err != nil {
		return nil, err
	}
	coll, err := ebpf.NewCollection(spec)
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
		}
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
	out.Rodata = maps["rodata"]
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
