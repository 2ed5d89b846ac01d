package redirect

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/vishvananda/netns"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// upgrade loads this binary's programs on top of the pinned maps and swaps
// them into every attached pod's links with link updates (tcx and cgroup links
// are replaced atomically, legacy filters with a netlink replace): no moment
// without capture, and flows, counters and addresses carry over.
func (s *store) upgrade(cfg config.Config, log *slog.Logger) error {
	old := s.dp
	nd, err := datapath.LoadReplacing(cfg, old)
	if err != nil {
		return err
	}
	recs, err := s.all()
	if err != nil {
		nd.Close()
		return err
	}
	var errs []error
	for _, r := range recs {
		dir := s.podDir(r.ID)
		for _, h := range cgroupHooks {
			pin := filepath.Join(dir, h.pin)
			if _, err := os.Stat(pin); err == nil {
				errs = append(errs, updateLink(pin, h.prog(nd)))
			}
		}
		ns := netns.NsHandle(-1)
		if h, err := podnet.Open(r.Netns); err == nil {
			ns = h
		}
		for _, a := range r.TC {
			if a.Mode == TCLegacy && ns < 0 {
				continue // netns gone: nothing to update
			}
			errs = append(errs, replaceTC(ns, a, tcProg(nd, a.Ingress), dir))
		}
		if ns >= 0 {
			ns.Close()
		}
	}
	proxies, _ := os.ReadDir(filepath.Join(s.root, proxyDir))
	for _, p := range proxies {
		errs = append(errs, updateLink(filepath.Join(s.root, proxyDir, p.Name(), "getsockopt"), nd.ProxyGetsockopt))
	}
	if err := errors.Join(errs...); err != nil {
		// Pods on old programs keep working (the maps are shared); the next
		// open retries, since the pinned version is still the old one.
		nd.Close()
		return fmt.Errorf("updating links: %w", err)
	}
	if err := nd.Repin(filepath.Join(s.root, dpDir)); err != nil {
		nd.Close()
		return err
	}
	old.Close()
	s.dp = nd
	log.Info("upgraded the programs of every pod", "pods", len(recs), "version", datapath.Version())
	return nil
}

// Upgrade swaps this binary's programs into every attached pod, even if the
// pinned ones are of the same version when force is set.
func Upgrade(o Options, force bool) error {
	s, err := openStore(o.Root)
	if err != nil {
		return err
	}
	defer s.Close()
	if _, err := s.datapath(&o.Config, o.log()); err != nil {
		return err
	}
	if !force {
		return nil
	}
	return s.upgrade(o.Config, o.log())
}
