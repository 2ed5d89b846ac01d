package redirect

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/rules"
)

// Counts is how many connections each rule took for one pod.
type Counts map[datapath.Rule]uint64

// Stats reads one pod's per-rule counters.
func Stats(o Options, id string) (Counts, error) {
	s, rec, dp, err := openPod(o, id)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	return dp.Counts(rec.NetnsCookie)
}

// StatsAll reads every pod's counters.
func StatsAll(o Options) (map[string]Counts, error) {
	s, err := openStore(o.Root)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	recs, err := s.all()
	if err != nil || len(recs) == 0 {
		return map[string]Counts{}, err
	}
	dp, err := s.datapath(nil, o.log())
	if err != nil {
		return nil, err
	}
	out := map[string]Counts{}
	for _, r := range recs {
		c, err := dp.Counts(r.NetnsCookie)
		if err != nil {
			return nil, err
		}
		out[r.ID] = c
	}
	return out, nil
}

// Explain decides q for the pod from the live state: the constants the
// pinned programs run with and the pod's entries in the maps.
func Explain(o Options, id string, q rules.Query) (rules.Decision, error) {
	s, rec, dp, err := openPod(o, id)
	if err != nil {
		return rules.Decision{}, err
	}
	defer s.Close()
	cfg, err := dp.LiveConfig()
	if err != nil {
		return rules.Decision{}, err
	}
	cfg.RouteTable = rec.Route.Table
	pod := rules.Pod{Local: map[netip.Addr]bool{}}
	var k datapath.LocalKey
	var v uint8
	it := dp.LocalAddrs.Iterate()
	for it.Next(&k, &v) {
		if k.Netns == rec.NetnsCookie {
			pod.Local[addrOf(k.Addr)] = true
		}
	}
	if err := it.Err(); err != nil {
		return rules.Decision{}, err
	}
	// Inbound: the interface whose subnet holds the destination, else the
	// first one (the pod's usual single interface).
	for i, ifc := range rec.Ifaces {
		var info datapath.IfaceInfo
		if err := dp.Ifaces.Lookup(datapath.IfaceKey{Netns: rec.NetnsCookie, Ifindex: uint32(ifc.Index)}, &info); err != nil {
			return rules.Decision{}, fmt.Errorf("interface %s of pod %s: %w", ifc.Name, id, err)
		}
		if i == 0 || addrOf(info.PrimaryIp) == q.Dst.Addr() {
			pod.Primary = addrOf(info.PrimaryIp)
		}
		if info.PrimaryIp == 0 {
			pod.Primary = netip.Addr{}
		}
	}
	return rules.Decide(cfg, pod, q), nil
}

func addrOf(v uint32) netip.Addr {
	var a [4]byte
	binary.NativeEndian.PutUint32(a[:], v)
	return netip.AddrFrom4(a)
}

// openPod opens the store, the pod's record and the datapath.
func openPod(o Options, id string) (*store, *Record, *datapath.Datapath, error) {
	if err := ValidatePodID(id); err != nil {
		return nil, nil, nil, err
	}
	s, err := openStore(o.Root)
	if err != nil {
		return nil, nil, nil, err
	}
	rec, err := s.get(id)
	if err == nil && rec == nil {
		err = fmt.Errorf("pod %s: %w", id, ErrNotAttached)
	}
	var dp *datapath.Datapath
	if err == nil {
		dp, err = s.datapath(nil, o.log())
	}
	if err != nil {
		s.Close()
		return nil, nil, nil, err
	}
	return s, rec, dp, nil
}
