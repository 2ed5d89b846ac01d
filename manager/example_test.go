package manager_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
	"github.com/ebpf-redirect/ebpf-redirect/manager"
)

// A node agent attaches a pod when it starts, reconciles after a restart, and
// detaches it when it goes. (Run as root: it builds a throwaway pod with its
// own bpffs; a node agent has the real ones.)
func Example() {
	run, err := topology.NewRun()
	if err != nil {
		log.Fatal(err)
	}
	defer run.Close()
	pod, err := run.NewPod()
	if err != nil {
		log.Fatal(err)
	}

	m, err := manager.New(manager.Options{BPFFS: run.BPFFS, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	ctx := context.Background()
	web := manager.Pod{ID: "web-1", Netns: pod.NetNSPath(), Cgroup: pod.PodCgroup, ProxyCgroup: pod.ProxyCgrp}

	res, err := m.AttachPod(ctx, web)
	fmt.Println("attached:", err == nil, "already:", res.AlreadyAttached)
	res, _ = m.AttachPod(ctx, web) // idempotent
	fmt.Println("again:", res.AlreadyAttached)

	// After a restart, tell the manager which pods should exist.
	rep, _ := m.Reconcile(ctx, []manager.Pod{web})
	fmt.Println("kept:", rep.Kept)

	pods, _ := m.Pods()
	fmt.Println(pods[0].ID, pods[0].Health)

	d, _ := m.Explain("web-1", manager.Query{Dst: mustAddrPort("10.77.0.1:80")})
	fmt.Println(d.Rule.Name, "->", d.To)

	fmt.Println("detached:", m.DetachPod(ctx, "web-1") == nil)
	// Output:
	// attached: true already: false
	// again: true
	// kept: [web-1]
	// web-1 healthy
	// out-redirect -> 127.0.0.1:15001
	// detached: true
}
