package agent

import (
	"context"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// Watch keeps, for every attached pod, a netlink subscription to its
// namespace's links and addresses, and refreshes the pod as soon as they
// change: an interface added to a running pod is captured within moments, not
// at the next periodic reconcile (until then the pod's ingress guard refuses
// new connections on it). The set of watched pods follows the attached ones,
// checked every resync.
func (a *Agent) Watch(ctx context.Context, resync time.Duration) {
	watched := map[string]context.CancelFunc{}
	defer func() {
		for _, cancel := range watched {
			cancel()
		}
	}()
	t := time.NewTicker(resync)
	defer t.Stop()
	for {
		pods, err := a.m.Pods()
		if err == nil {
			live := map[string]bool{}
			for _, p := range pods {
				live[p.ID] = true
				if _, ok := watched[p.ID]; ok || p.Health != "healthy" {
					continue
				}
				wctx, cancel := context.WithCancel(ctx)
				watched[p.ID] = cancel
				go a.watchPod(wctx, p.ID, p.Netns)
			}
			for id, cancel := range watched {
				if !live[id] {
					cancel()
					delete(watched, id)
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.podsChanged:
		}
	}
}

func (a *Agent) watchPod(ctx context.Context, id, nsPath string) {
	ns, err := podnet.Open(nsPath)
	if err != nil {
		return
	}
	defer ns.Close()
	done := make(chan struct{})
	defer close(done)
	links := make(chan netlink.LinkUpdate, 16)
	addrs := make(chan netlink.AddrUpdate, 16)
	h := netns.NsHandle(ns)
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{Namespace: &h}); err != nil {
		a.log.Warn("watching links", "pod", id, "err", err)
		return
	}
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{Namespace: &h}); err != nil {
		a.log.Warn("watching addresses", "pod", id, "err", err)
		return
	}
	a.watched.Inc()
	defer a.watched.Dec()
	// Whatever changed between the attach and the subscription.
	debounce := time.After(0)
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-links:
			if !ok {
				return
			}
			debounce = time.After(100 * time.Millisecond)
		case _, ok := <-addrs:
			if !ok {
				return
			}
			debounce = time.After(100 * time.Millisecond)
		case <-debounce:
			debounce = nil
			changed, err := a.m.Refresh(id)
			if err != nil {
				a.errors.WithLabelValues("refresh").Inc()
				a.log.Warn("refresh", "pod", id, "err", err)
				continue
			}
			if changed {
				a.refreshed.Inc()
				a.log.Info("refreshed pod after a change in its namespace", "pod", id)
			}
		}
	}
}
