package redirect

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
)

// ErrNothingPinned: Upgrade found no datapath to upgrade.
var ErrNothingPinned = errors.New("nothing to upgrade: no datapath is pinned")

// UpgradeReport says what Upgrade did.
type UpgradeReport struct {
	From string `json:"from"` // pinned version before
	To   string `json:"to"`   // this binary's version
	// Pods whose links now run the new programs.
	Pods int `json:"pods"`
	// Links updated in place (cgroup, tcx, legacy filters, proxy).
	Links int `json:"links"`
	// Unchanged: the pinned programs were this binary's already.
	Unchanged bool `json:"unchanged,omitempty"`
}

// Upgrade loads this binary's programs on top of the pinned maps and swaps
// them into every attached pod's links with link updates (tcx and cgroup
// links are replaced atomically, legacy filters with a netlink replace): no
// moment without capture, and flows, counters and addresses carry over. It is
// the only operation that moves a store to this binary's programs or schema;
// without force it does nothing when the pinned programs are this binary's.
// If anything fails, every link is put back on the programs it ran before.
func Upgrade(ctx context.Context, o Options, force bool) (UpgradeReport, error) {
	rep := UpgradeReport{To: datapath.Version()}
	s, err := openStore(o, true)
	if err != nil {
		return rep, err
	}
	defer s.Close()
	dir := filepath.Join(s.root, dpDir)
	if rep.From, err = datapath.PinnedVersion(dir); errors.Is(err, os.ErrNotExist) {
		return rep, fmt.Errorf("%s: %w", s.root, ErrNothingPinned)
	} else if err != nil {
		return rep, err
	}
	if rep.From == rep.To && !force && datapath.CheckSchema(dir, o.Datapath) == nil {
		rep.Unchanged = true
		return rep, nil
	}
	nd, err := datapath.PrepareUpgrade(dir, o.Config, o.Datapath)
	if err != nil {
		return rep, err
	}
	recs, err := s.all()
	if err != nil {
		nd.Close()
		return rep, err
	}
	sw := &swapper{}
	err = sw.all(ctx, s, nd, recs)
	if err == nil {
		// From here the links run the new programs; the pins follow.
		err = nd.Commit(dir)
		if err != nil {
			err = fmt.Errorf("the links run the new programs, but pinning them failed (run upgrade again): %w", err)
		}
	} else if rerr := sw.rollback(); rerr != nil {
		err = errors.Join(err, fmt.Errorf("putting links back on the old programs: %w", rerr))
	}
	sw.close()
	if err != nil {
		nd.Close()
		return rep, err
	}
	if s.dp != nil {
		s.dp.Close()
	}
	s.dp = nd
	rep.Pods, rep.Links = len(recs), sw.n
	o.log().Info("upgraded the programs of every pod", "pods", rep.Pods, "links", rep.Links, "from", rep.From, "to", rep.To)
	return rep, nil
}

// swapper updates links one by one and remembers how to put each back.
type swapper struct {
	n    int
	undo []func() error
	old  []*ebpf.Program
}

// all swaps the new programs into every link of every pod and proxy.
func (sw *swapper) all(ctx context.Context, s *store, nd *datapath.Datapath, recs []*Record) error {
	podHooks, err := nd.Hooks(datapath.ScopePod)
	if err != nil {
		return err
	}
	proxyHooks, err := nd.Hooks(datapath.ScopeProxy)
	if err != nil {
		return err
	}
	tcProg := map[string]*ebpf.Program{}
	for _, scope := range []string{datapath.ScopeTC, datapath.ScopeLo} {
		hooks, err := nd.Hooks(scope)
		if err != nil {
			return err
		}
		for _, h := range hooks {
			tcProg[h.Name] = h.Program
		}
	}
	for _, r := range recs {
		if err := ctx.Err(); err != nil {
			return err
		}
		dir := s.podDir(r.ID)
		for _, h := range podHooks {
			if err := sw.link(filepath.Join(dir, h.Name), h.Program); err != nil {
				return fmt.Errorf("pod %s: %w", r.ID, err)
			}
		}
		if err := sw.tc(r, dir, tcProg); err != nil {
			return fmt.Errorf("pod %s: %w", r.ID, err)
		}
	}
	proxies, err := os.ReadDir(filepath.Join(s.root, proxiesDir))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, p := range proxies {
		for _, h := range proxyHooks {
			if err := sw.link(filepath.Join(s.root, proxiesDir, p.Name(), h.Name), h.Program); err != nil {
				return fmt.Errorf("proxy cgroup %s: %w", p.Name(), err)
			}
		}
	}
	return nil
}

// link updates one pinned link (cgroup or tcx). A pod whose attach never got
// that far has no such pin: nothing to update.
func (sw *swapper) link(path string, prog *ebpf.Program) error {
	l, err := openLink(path)
	if l == nil {
		return err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	old, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		return fmt.Errorf("%s: its program: %w", path, err)
	}
	sw.old = append(sw.old, old)
	if err := l.Update(prog); err != nil {
		return fmt.Errorf("updating %s: %w", path, err)
	}
	sw.n++
	sw.undo = append(sw.undo, func() error { return updateLink(path, old) })
	return nil
}

// tc updates the tc attachments of one pod. Legacy filters are replaced
// through the netns, and only if the record's path still names the pod's
// namespace (by cookie): a filter in another namespace is never touched.
func (sw *swapper) tc(r *Record, dir string, prog map[string]*ebpf.Program) error {
	ns := openSameNetns(r)
	if ns >= 0 {
		defer ns.Close()
	}
	for _, a := range r.TC {
		p := prog[a.Prog]
		if p == nil {
			return fmt.Errorf("the new programs have no %s for the %s attachment on %s", a.Prog, a.dir(), a.Iface)
		}
		if a.Mode == TCX {
			if err := sw.link(a.pin(dir), p); err != nil {
				return err
			}
			continue
		}
		if ns < 0 {
			continue // the netns is gone (or another one): its filters with it
		}
		h, err := netlink.NewHandleAt(ns)
		if err != nil {
			return err
		}
		// Hold the old program before it loses its filter (rollback).
		var old *ebpf.Program
		oldID, err := legacyProgID(h, a)
		if err == nil {
			old, err = ebpf.NewProgramFromID(oldID)
		}
		if err == nil {
			sw.old = append(sw.old, old)
			err = h.FilterReplace(a.filter(p))
		}
		h.Close()
		if err != nil {
			return fmt.Errorf("replacing the %s filter on %s: %w", a.dir(), a.Iface, err)
		}
		sw.n++
		a := a
		sw.undo = append(sw.undo, func() error {
			ns := openSameNetns(r)
			if ns < 0 {
				return nil
			}
			defer ns.Close()
			return replaceTC(ns, a, old, dir)
		})
	}
	return nil
}

// rollback puts every updated link back, newest first.
func (sw *swapper) rollback() error {
	var errs []error
	for i := len(sw.undo) - 1; i >= 0; i-- {
		errs = append(errs, sw.undo[i]())
	}
	return errors.Join(errs...)
}

func (sw *swapper) close() {
	for _, p := range sw.old {
		p.Close()
	}
}
