package standin_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/privtest"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
)

func TestMain(m *testing.M) {
	standin.MaybeRunRole()
	os.Exit(m.Run())
}

// Without any redirection, agents in a fresh pod reach each other directly, sit in the
// cgroups they were started in, and record what they saw.
func TestAgentsPlainRouting(t *testing.T) {
	privtest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	run, err := topology.NewRun()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = run.Close() })
	pod, err := run.NewPod()
	if err != nil {
		t.Fatal(err)
	}
	start := func(role, ns, cg string) *standin.Agent {
		return standin.MustStart(t, ctx, standin.StartOptions{Role: role, NetNSPath: ns, CgroupDir: cg})
	}
	app := start(standin.RoleApp, pod.NetNSPath(), pod.PodCgroup)
	peer := start(standin.RolePeer, pod.PeerNetNSPath(), pod.PeerCgroup)
	proxy := start(standin.RoleProxy, pod.NetNSPath(), pod.ProxyCgrp)

	procs, err := os.ReadFile(filepath.Join(pod.PodCgroup, "cgroup.procs"))
	if err != nil || strings.TrimSpace(string(procs)) == "" {
		t.Fatalf("app agent not in the pod cgroup: %q %v", procs, err)
	}

	if _, err := peer.Listen(ctx, standin.ListenSpec{Proto: "tcp", Addr: "0.0.0.0:80"}); err != nil {
		t.Fatal(err)
	}
	if _, err := peer.Listen(ctx, standin.ListenSpec{Proto: "udp", Addr: "0.0.0.0:5353"}); err != nil {
		t.Fatal(err)
	}
	if err := proxy.StartProxy(ctx, standin.ProxySpec{Outbound: true, Inbound: true, HBONE: true}); err != nil {
		t.Fatal(err)
	}
	res, err := app.Dial(ctx, standin.DialSpec{Proto: "tcp", Dst: "10.77.0.1:80", Token: "t1", Size: 100000})
	if err != nil {
		t.Fatal(err)
	}
	if res.Outcome != "ok" || res.Reply != "RESP peer:80 t1 100000 intact" || !strings.HasPrefix(res.Local, "10.77.0.2:") || res.Peer != "10.77.0.1:80" {
		t.Fatalf("dial: %+v", res)
	}
	res, err = app.Dial(ctx, standin.DialSpec{Proto: "udp", Dst: "10.77.0.1:5353", Token: "u1"})
	if err != nil || res.Outcome != "ok" || res.Reply != "RESP peer:5353/udp u1 0" {
		t.Fatalf("udp dial: %+v %v", res, err)
	}
	// The proxy's HBONE listener answers as a server, on the dual-stack socket.
	res, err = peer.Dial(ctx, standin.DialSpec{Proto: "tcp", Dst: "10.77.0.2:15008", Token: "h"})
	if err != nil || res.Outcome != "ok" || res.Reply != "RESP proxy:15008 h 0 intact" {
		t.Fatalf("hbone dial: %+v %v", res, err)
	}
	// Self call refused: the proxy closes, the client reads end of file.
	res, err = app.Dial(ctx, standin.DialSpec{Proto: "tcp", Dst: "127.0.0.1:15001", Token: "s"})
	if err != nil || res.Outcome != standin.OutcomeEOF {
		t.Fatalf("self call: %+v %v", res, err)
	}
	ev, err := standin.Collect(ctx, app, peer, proxy)
	if err != nil {
		t.Fatal(err)
	}
	srv := ev[peer].Server
	if len(srv) != 2 || srv[0].Peer != "10.77.0.2:"+strings.Split(ev[peer].Server[0].Peer, ":")[1] || srv[0].Request != "REQ t1 100000 intact" {
		t.Fatalf("peer events: %+v", srv)
	}
	if srv[1].Proto != "udp" || srv[1].Local != "10.77.0.1:5353" {
		t.Fatalf("udp event: %+v", srv[1])
	}
	px := ev[proxy].Proxy
	if len(px) != 2 {
		t.Fatalf("proxy events: %+v", px)
	}
	for _, e := range px {
		switch e.Listener {
		case standin.PortHBONE:
			if e.Action != standin.ActionServed || e.OrigDst != "10.77.0.2:15008" || e.Local != "[::ffff:10.77.0.2]:15008" {
				t.Errorf("hbone event: %+v", e)
			}
		case standin.PortOutbound:
			if e.Action != standin.ActionSelfCall || e.OrigDst != "127.0.0.1:15001" {
				t.Errorf("self-call event: %+v", e)
			}
		default:
			t.Errorf("unexpected event %+v", e)
		}
	}
	t.Logf("events: %+v", ev)
}
