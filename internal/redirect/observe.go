package redirect

import (
	"fmt"
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/rules"
)

// Counts is how many connections each rule of each family took for one pod.
type Counts map[datapath.Count]uint64

// Stats reads one pod's per-rule counters, and the config the datapath runs
// with (to render the rules).
func Stats(o Options, id string) (Counts, config.Config, error) {
	s, rec, dp, err := openPod(o, id)
	if err != nil {
		return nil, config.Config{}, err
	}
	defer s.Close()
	cfg, err := dp.LiveConfig()
	if err != nil {
		return nil, cfg, err
	}
	c, err := dp.Counts(rec.NetnsCookie)
	return c, cfg, err
}

// StatsAll reads every pod's counters.
func StatsAll(o Options) (map[string]Counts, config.Config, error) {
	s, err := openStore(o, false)
	if err != nil {
		return nil, config.Config{}, err
	}
	defer s.Close()
	recs, err := s.all()
	if err != nil || len(recs) == 0 {
		return map[string]Counts{}, config.Config{}, err
	}
	dp, err := s.datapath(nil, o)
	if err != nil {
		return nil, config.Config{}, err
	}
	cfg, err := dp.LiveConfig()
	if err != nil {
		return nil, cfg, err
	}
	out := map[string]Counts{}
	for _, r := range recs {
		c, err := dp.Counts(r.NetnsCookie)
		if err != nil {
			return nil, cfg, err
		}
		out[r.ID] = c
	}
	return out, cfg, nil
}

// Explain asks the pinned programs' own rule functions (bpf/explain.c) how
// they decide q for the pod, against the pod's live map entries and the
// constants they run with, and words the answer.
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
	eq := datapath.ExplainQuery{
		Netns: rec.NetnsCookie,
		Dst:   datapath.Addr(q.Dst.Addr()),
		Dport: q.Dst.Port(),
		Mark:  q.Mark,
		Proto: unix.IPPROTO_TCP,
	}
	if q.UDP {
		eq.Proto = unix.IPPROTO_UDP
	}
	if q.Inbound {
		eq.Inbound, eq.Src = 1, datapath.Addr(q.Src.Addr())
		if eq.Ifindex, err = rec.arrival(q.Iface, q.Dst.Addr()); err != nil {
			return rules.Decision{}, err
		}
	} else if q.Device != "" {
		if eq.Ifindex, err = rec.ifindex(q.Device); err != nil {
			return rules.Decision{}, err
		}
	}
	ans, err := dp.Explain(eq)
	if err != nil {
		return rules.Decision{}, err
	}
	to := netip.AddrPortFrom(datapath.AddrOf(ans.To), ans.ToPort)
	return rules.Describe(cfg, q, datapath.Rule(ans.Rule), ans.Family, to), nil
}

// ifindex names one of the pod's interfaces by name ("lo" included).
func (r *Record) ifindex(name string) (uint32, error) {
	if name == "lo" {
		return 1, nil
	}
	i := slices.IndexFunc(r.Ifaces, func(x Iface) bool { return x.Name == name })
	if i < 0 {
		return 0, fmt.Errorf("pod %s has no interface %s", r.ID, name)
	}
	return uint32(r.Ifaces[i].Index), nil
}

// arrival is the interface an inbound connection to dst arrives on: the one
// named, else the one whose primary address dst is, else the first.
func (r *Record) arrival(name string, dst netip.Addr) (uint32, error) {
	if name != "" {
		return r.ifindex(name)
	}
	d := dst.WithZone("").Unmap().String()
	for _, ifc := range r.Ifaces {
		if ifc.Primary == d || ifc.Primary6 == d || ifc.LL6 == d {
			return uint32(ifc.Index), nil
		}
	}
	return uint32(r.Ifaces[0].Index), nil
}

// openPod opens the store, the pod's record and the datapath.
func openPod(o Options, id string) (*store, *Record, *datapath.Datapath, error) {
	if err := ValidatePodID(id); err != nil {
		return nil, nil, nil, err
	}
	s, err := openStore(o, false)
	if err != nil {
		return nil, nil, nil, err
	}
	rec, err := s.get(id)
	if err == nil && rec == nil {
		err = fmt.Errorf("pod %s: %w", id, ErrNotAttached)
	}
	var dp *datapath.Datapath
	if err == nil {
		dp, err = s.datapath(nil, o)
	}
	if err != nil {
		s.Close()
		return nil, nil, nil, err
	}
	return s, rec, dp, nil
}
