package redirect

import (
	"fmt"
	"path/filepath"

	"github.com/cilium/ebpf/link"

	"github.com/ebpf-redirect/ebpf-redirect/internal/cgroup"
	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// Pod states, as list and the Go API report them.
const (
	StateHealthy   = "healthy"   // attached, every piece in place
	StateDefunct   = "defunct"   // attached, but the netns, cgroup or a link is gone
	StateAttaching = "attaching" // an attach that has not finished (or crashed)
)

// Status is one pod's record and its state.
type Status struct {
	*Record
	Health  string `json:"health"`
	Problem string `json:"problem,omitempty"`
}

// health checks every piece a record says is attached.
func health(s *store, r *Record) error {
	cg, err := cgroup.Open(r.Cgroup)
	if err != nil {
		return fmt.Errorf("cgroup: %w", err)
	}
	if cg.ID != r.CgroupID {
		return fmt.Errorf("cgroup %s was recreated", r.Cgroup)
	}
	ns, err := podnet.Open(r.Netns)
	if err != nil {
		return fmt.Errorf("netns: %w", err)
	}
	defer ns.Close()
	if c, err := podnet.Cookie(ns); err != nil || c != r.NetnsCookie {
		return fmt.Errorf("netns %s is another namespace now", r.Netns)
	}
	dir := s.podDir(r.ID)
	if err := linksAlive(dir, datapath.ScopePod); err != nil {
		return err
	}
	for _, a := range r.TC {
		if err := tcPresent(ns, a, dir); err != nil {
			return err
		}
	}
	if r.ProxyCgroupID != 0 {
		if err := linksAlive(s.proxyDir(r.ProxyCgroupID), datapath.ScopeProxy); err != nil {
			return fmt.Errorf("proxy %w", err)
		}
	}
	return nil
}

// linksAlive checks the link of every hook of scope pinned in dir.
func linksAlive(dir, scope string) error {
	hooks, err := datapath.HookSpecs(scope)
	if err != nil {
		return err
	}
	for _, h := range hooks {
		if err := linkAlive(filepath.Join(dir, h.Name)); err != nil {
			return err
		}
	}
	return nil
}

// linkAlive checks a pinned link is still attached (a cgroup link whose
// cgroup was removed is "defunct" in the kernel's words).
func linkAlive(path string) error {
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return fmt.Errorf("link %s: %w", filepath.Base(path), err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return fmt.Errorf("link %s: %w", filepath.Base(path), err)
	}
	if cg := info.Cgroup(); cg != nil && cg.CgroupId == 0 {
		return fmt.Errorf("link %s: its cgroup is gone", filepath.Base(path))
	}
	return nil
}

func statusOf(s *store, r *Record) Status {
	st := Status{Record: r, Health: StateHealthy}
	if r.State != stateAttached {
		st.Health = StateAttaching
		return st
	}
	if err := health(s, r); err != nil {
		st.Health, st.Problem = StateDefunct, err.Error()
	}
	return st
}

// List returns every recorded pod with its state.
func List(o Options) ([]Status, error) {
	s, err := openStore(o, false)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	recs, err := s.all()
	if err != nil {
		return nil, err
	}
	out := make([]Status, 0, len(recs))
	for _, r := range recs {
		out = append(out, statusOf(s, r))
	}
	return out, nil
}

// Get returns one pod's record and state.
func Get(o Options, id string) (Status, error) {
	if err := ValidatePodID(id); err != nil {
		return Status{}, err
	}
	s, err := openStore(o, false)
	if err != nil {
		return Status{}, err
	}
	defer s.Close()
	r, err := s.get(id)
	if err != nil {
		return Status{}, err
	}
	if r == nil {
		return Status{}, fmt.Errorf("pod %s: %w", id, ErrNotAttached)
	}
	return statusOf(s, r), nil
}
