package test

// A node agent's life (issue 3): restarts, upgrades, crashes, gone pods,
// concurrency, and what the counters and explain say, all on live traffic.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
	"github.com/ebpf-redirect/ebpf-redirect/internal/redirect"
	"github.com/ebpf-redirect/ebpf-redirect/manager"
)

// livePod is a pod with the stand-in proxy, an app and a peer running, and
// servers on R:80 and on the app's :8080.
type livePod struct {
	t                *testing.T
	run              *topology.Run
	pod              *topology.Pod
	proxy, app, peer *standin.Agent
}

func newLivePod(t *testing.T, r *topology.Run) *livePod {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	lp := &livePod{t: t, run: r, pod: newPod(t, r)}
	start := func(role, ns, cg string) *standin.Agent {
		a, err := standin.Start(ctx, standin.StartOptions{Role: role, NetNSPath: ns, CgroupDir: cg})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = a.Close() })
		return a
	}
	lp.proxy = start(standin.RoleProxy, lp.pod.NetNSPath(), lp.pod.ProxyCgrp)
	lp.app = start(standin.RoleApp, lp.pod.NetNSPath(), lp.pod.PodCgroup)
	lp.peer = start(standin.RolePeer, lp.pod.PeerNetNSPath(), lp.pod.PeerCgroup)
	if err := lp.proxy.StartProxy(ctx, standin.ProxySpec{Outbound: true, Inbound: true, HBONE: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := lp.peer.Listen(ctx, standin.ListenSpec{Proto: "tcp", Addr: "0.0.0.0:80"}); err != nil {
		t.Fatal(err)
	}
	if _, err := lp.app.Listen(ctx, standin.ListenSpec{Proto: "tcp", Addr: "0.0.0.0:8080"}); err != nil {
		t.Fatal(err)
	}
	return lp
}

func (lp *livePod) spec() manager.Pod {
	return manager.Pod{ID: lp.pod.ID, Netns: lp.pod.NetNSPath(), Cgroup: lp.pod.PodCgroup, ProxyCgroup: lp.pod.ProxyCgrp}
}

// out dials R:80 from the app; in dials the app's :8080 from R.
func (lp *livePod) out(ctx context.Context, token string, holdMS int) (standin.DialResult, error) {
	return lp.app.Dial(ctx, standin.DialSpec{Proto: "tcp", Dst: "10.77.0.1:80", Token: token, HoldMS: holdMS})
}

func (lp *livePod) in(ctx context.Context, token string, holdMS int) (standin.DialResult, error) {
	return lp.peer.Dial(ctx, standin.DialSpec{Proto: "tcp", Dst: "10.77.0.2:8080", Token: token, HoldMS: holdMS})
}

// proxied returns how many connections the proxy relayed since the last call.
func (lp *livePod) proxied(ctx context.Context) (out, in int) {
	lp.t.Helper()
	evs, err := standin.Collect(ctx, lp.proxy, lp.app, lp.peer)
	if err != nil {
		lp.t.Fatal(err)
	}
	for _, e := range evs[lp.proxy].Proxy {
		if e.Action != standin.ActionRelayed {
			continue
		}
		switch e.Listener {
		case standin.PortOutbound:
			out++
		case standin.PortInbound:
			in++
		}
	}
	return out, in
}

// loop dials out and in until stop is closed, counting successes and failures.
type loop struct {
	ok, failed atomic.Int64
	firstErr   atomic.Value
	done       chan struct{}
}

func startLoop(lp *livePod, stop <-chan struct{}) *loop {
	l := &loop{done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			dial := lp.out
			want := "peer:80"
			if i%2 == 1 {
				dial, want = lp.in, "app:8080"
			}
			res, err := dial(ctx, fmt.Sprintf("loop-%d", i), 0)
			cancel()
			if err != nil || res.Outcome != standin.OutcomeOK || !strings.Contains(res.Reply, want) {
				l.failed.Add(1)
				l.firstErr.CompareAndSwap(nil, fmt.Sprintf("dial %d: %v %+v", i, err, res))
				continue
			}
			l.ok.Add(1)
		}
	}()
	return l
}

// progress waits until the loop has made n more successful connections (or
// any failed one): traffic is known to flow, whatever the machine's speed.
func (l *loop) progress(t *testing.T, n int64) {
	t.Helper()
	start := l.ok.Load()
	deadline := time.Now().Add(30 * time.Second)
	for l.ok.Load() < start+n && l.failed.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the connection loop made %d connections in 30s", l.ok.Load()-start)
		}
		select {
		case <-l.done:
			t.Fatalf("the connection loop stopped")
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// serveProc is `ebpf-redirect serve` running as its own process.
type serveProc struct {
	cmd  *exec.Cmd
	addr string
	out  *bytes.Buffer
}

func startServe(t *testing.T, r *topology.Run) *serveProc {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	sp := &serveProc{addr: addr, out: &bytes.Buffer{}}
	sp.cmd = exec.Command(ebpfBinary(t), "serve", "--bpffs", r.BPFFS, "--listen", addr, "--prune-every", "1h")
	sp.cmd.Stdout, sp.cmd.Stderr = sp.out, sp.out
	sp.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := sp.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sp.cmd.Process.Kill(); _ = sp.cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get("http://" + addr + "/healthz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return sp
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("serve did not come up: %s", sp.out)
	return nil
}

func (sp *serveProc) call(t *testing.T, method, path string, body any) (int, string) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, "http://"+sp.addr+path, rd)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// waitMetric waits until /metrics has a line.
func (sp *serveProc) waitMetric(t *testing.T, line string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, body := sp.call(t, "GET", "/metrics", nil)
		if strings.Contains(body, line+"\n") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/metrics never showed %q:\n%s", line, sp.out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The agent is SIGKILLed while traffic flows: the pod keeps its redirect the
// whole time, and a new agent process adopts the pinned state.
func TestRestartKeepsCapture(t *testing.T) {
	r := lifecycleRun(t)
	lp := newLivePod(t, r)
	first := startServe(t, r)
	if code, body := first.call(t, "POST", "/pods", lp.spec()); code != 200 {
		t.Fatalf("attach through the API: %d %s", code, body)
	}
	if code, body := first.call(t, "POST", "/pods", lp.spec()); code != 200 || !strings.Contains(body, `"AlreadyAttached":true`) {
		t.Fatalf("second attach through the API is not a no-op: %d %s", code, body)
	}
	stop := make(chan struct{})
	l := startLoop(lp, stop)
	l.progress(t, 4)
	if err := first.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = first.cmd.Wait()
	l.progress(t, 4) // traffic with no agent at all
	second := startServe(t, r)
	l.progress(t, 4)
	close(stop)
	<-l.done

	if l.failed.Load() != 0 {
		t.Fatalf("%d of %d connections failed across the restart; first: %v", l.failed.Load(), l.ok.Load()+l.failed.Load(), l.firstErr.Load())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	out, in := lp.proxied(ctx)
	if int64(out+in) != l.ok.Load() || out == 0 || in == 0 {
		t.Fatalf("not every connection went through the proxy: %d out + %d in relayed, %d made", out, in, l.ok.Load())
	}
	code, body := second.call(t, "GET", "/pods", nil)
	if code != 200 || !strings.Contains(body, `"health":"healthy"`) || !strings.Contains(body, lp.pod.ID) {
		t.Fatalf("the new agent did not adopt the pod: %d %s", code, body)
	}
	code, body = second.call(t, "GET", "/metrics", nil)
	for _, want := range []string{
		fmt.Sprintf(`ebpf_redirect_connections_total{chain="nat ISTIO_OUTPUT 4",family="ipv4",pod="%s",rule="out-redirect"}`, lp.pod.ID),
		fmt.Sprintf(`ebpf_redirect_connections_total{chain="nat ISTIO_PRERT 2",family="ipv4",pod="%s",rule="in-redirect"}`, lp.pod.ID),
		`ebpf_redirect_pods{state="healthy"} 1`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s (status %d)", want, code)
		}
	}
	if code, body := second.call(t, "DELETE", "/pods/"+lp.pod.ID, nil); code != 200 {
		t.Fatalf("detach through the adopting agent: %d %s", code, body)
	}
	if code, _ := second.call(t, "DELETE", "/pods/"+lp.pod.ID, nil); code != 404 {
		t.Fatalf("detaching an unknown pod: status %d, want 404", code)
	}
	code, body = second.call(t, "GET", "/metrics", nil)
	if !strings.Contains(body, "ebpf_redirect_operation_seconds_count{op=\"detach\"} 2") || !strings.Contains(body, `ebpf_redirect_operation_errors_total{op="detach"} 1`) {
		t.Errorf("metrics do not count the detaches and the error: %d\n%s", code, grepLines(body, "ebpf_redirect_operation"))
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// ourLinks lists the kernel's links whose program is one of this run's
// datapath programs (other runs on the machine have their own).
func ourLinks(t *testing.T, bpffs string) map[link.ID]ebpf.ProgramID {
	t.Helper()
	ours := map[ebpf.ProgramID]bool{}
	pins, _ := filepath.Glob(filepath.Join(bpffs, "dp", "progs", "*"))
	for _, p := range pins {
		prog, err := ebpf.LoadPinnedProgram(p, nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := prog.Info()
		prog.Close()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		ours[id] = true
	}
	out := map[link.ID]ebpf.ProgramID{}
	var it link.Iterator
	defer it.Close()
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil {
			continue
		}
		if ours[info.Program] {
			out[info.ID] = info.Program
		}
	}
	return out
}

// New programs replace old ones on every attached pod with link updates:
// connections established before stay up, none made during it fails.
func TestUpgradeIsSeamless(t *testing.T) {
	for _, tc := range []struct{ mode, how string }{{"tcx", "force"}, {"legacy", "force"}, {"tcx", "new-version"}} {
		mode := tc.mode
		t.Run(tc.mode+"/"+tc.how, func(t *testing.T) {
			r := lifecycleRun(t)
			lp := newLivePod(t, r)
			if res := runCLI(t, nil, append(attachArgs(r, lp.pod), "--tc-mode", mode)...); res.code != 0 {
				t.Fatalf("attach: %s", res.output)
			}
			t.Cleanup(func() { runCLI(t, nil, "detach", "--pod-id", lp.pod.ID, "--bpffs", r.BPFFS) })
			before := ourLinks(t, r.BPFFS)

			// Connections established before the upgrade, idle across it.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var wg sync.WaitGroup
			held := make([]standin.DialResult, 2)
			heldErr := make([]error, 2)
			for i, dial := range []func(context.Context, string, int) (standin.DialResult, error){lp.out, lp.in} {
				wg.Add(1)
				go func() {
					defer wg.Done()
					held[i], heldErr[i] = dial(ctx, fmt.Sprintf("held-%d", i), 1500)
				}()
			}
			stop := make(chan struct{})
			l := startLoop(lp, stop)
			l.progress(t, 4)
			upgrade := []string{"upgrade", "--force", "--bpffs", r.BPFFS}
			if tc.how == "new-version" {
				// Pretend the pinned programs are an older build of this
				// schema: a plain upgrade must then swap them.
				setPinnedVersion(t, r.BPFFS, "0123456789abcdef")
				upgrade = []string{"upgrade", "--bpffs", r.BPFFS}
				// Anything else leaves another version's programs alone.
				if res := runCLI(t, nil, "list", "--bpffs", r.BPFFS); res.code != 0 {
					t.Fatalf("list: %s", res.output)
				}
				if now := ourLinks(t, r.BPFFS); !maps.Equal(now, before) {
					t.Fatalf("a command other than upgrade changed the programs: %v, before %v", now, before)
				}
			}
			if res := runCLI(t, nil, upgrade...); res.code != 0 || !strings.Contains(res.output, "upgraded the programs of every pod") {
				t.Fatalf("upgrade: %s", res.output)
			}
			l.progress(t, 4)
			close(stop)
			<-l.done
			wg.Wait()

			for i := range held {
				if heldErr[i] != nil || held[i].Outcome != standin.OutcomeOK {
					t.Errorf("connection established before the upgrade broke: %v %+v", heldErr[i], held[i])
				}
			}
			if l.failed.Load() != 0 || l.ok.Load() == 0 {
				t.Fatalf("%d of %d connections failed during the upgrade; first: %v", l.failed.Load(), l.ok.Load()+l.failed.Load(), l.firstErr.Load())
			}
			after := ourLinks(t, r.BPFFS)
			if len(after) == 0 || (mode == "tcx" && len(after) != len(before)) {
				t.Fatalf("links before %d, after %d", len(before), len(after))
			}
			for id, prog := range after {
				if old, ok := before[id]; !ok || old == prog {
					t.Errorf("link %d: program %d before, %d after: not updated in place", id, old, prog)
				}
			}
			if res := runCLI(t, nil, "list", "--bpffs", r.BPFFS); !strings.Contains(res.output, "healthy") {
				t.Errorf("after the upgrade: %s", res.output)
			}
		})
	}
}

// listed is what `list --json` says of a pod (ok: it is listed).
func listed(t *testing.T, r *topology.Run, id string) (p manager.PodStatus, ok bool) {
	t.Helper()
	res := runCLI(t, nil, "list", "--json", "--bpffs", r.BPFFS)
	var pods []manager.PodStatus
	if err := json.Unmarshal([]byte(res.output), &pods); err != nil {
		t.Fatalf("list --json: %v: %s", err, res.output)
	}
	for _, p := range pods {
		if p.ID == id {
			return p, true
		}
	}
	return manager.PodStatus{}, false
}

// podHealth is a pod's health as `list --json` gives it, "" if not listed.
func podHealth(t *testing.T, r *topology.Run, id string) string {
	t.Helper()
	p, ok := listed(t, r, id)
	if !ok {
		return ""
	}
	return p.Health
}

// setPinnedVersion rewrites the version recorded in a run's datapath meta.
func setPinnedVersion(t *testing.T, bpffs, version string) {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(bpffs, "dp", "meta"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var v []byte
	if err := m.Lookup(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
	var meta map[string]any
	if err := json.Unmarshal(bytes.TrimRight(v, "\x00"), &meta); err != nil {
		t.Fatal(err)
	}
	meta["version"] = version
	b, _ := json.Marshal(meta)
	nv := make([]byte, len(v))
	copy(nv, b)
	if err := m.Put(uint32(0), nv); err != nil {
		t.Fatal(err)
	}
}

// An attach killed between any two steps leaves nothing behind once the next
// reconcile has run, and the pod can then be attached.
func TestCrashMidAttachThenReconcile(t *testing.T) {
	r := lifecycleRun(t)
	anchor := newPod(t, r) // keeps the datapath loaded, and must stay untouched
	if res := runCLI(t, nil, attachArgs(r, anchor)...); res.code != 0 {
		t.Fatalf("attach: %s", res.output)
	}
	t.Cleanup(func() { runCLI(t, nil, "detach", "--pod-id", anchor.ID, "--bpffs", r.BPFFS) })
	anchorBefore := inspectPod(t, r, anchor)
	linksBefore := len(ourLinks(t, r.BPFFS))
	for _, step := range redirect.AttachSteps() {
		t.Run("crash before "+step, func(t *testing.T) {
			p := newPod(t, r)
			before := inspectPod(t, r, p)
			res := runFaultCLI(t, []string{crashEnv + "=" + step}, attachArgs(r, p)...)
			if res.code != -1 && res.code != 137 {
				t.Fatalf("want the process killed, got exit %d: %s", res.code, res.output)
			}
			state := podHealth(t, r, p.ID)
			switch {
			case step == redirect.StepRecord:
				// Killed before anything was made: nothing to follow.
				if state != "" {
					t.Fatalf("a record (%s) of an attach that made nothing", state)
				}
			case state != redirect.StateAttaching:
				t.Fatalf("the crashed attach left no record to follow (state %q)", state)
			default:
				if res := runCLI(t, nil, "reconcile", "--bpffs", r.BPFFS); res.code != 0 || !strings.Contains(res.output, p.ID) {
					t.Fatalf("reconcile: %d %s", res.code, res.output)
				}
			}
			if after := inspectPod(t, r, p); !equalState(after, before) {
				t.Fatalf("after reconcile: %+v, before the attach: %+v", after, before)
			}
			if n := len(ourLinks(t, r.BPFFS)); n != linksBefore {
				t.Fatalf("%d links of ours in the kernel, %d before the crashed attach", n, linksBefore)
			}
			if legacyFilters(t, p) != 0 {
				t.Fatal("a tc filter is still on the pod's interface")
			}
			if now := inspectPod(t, r, anchor); !equalState(now, anchorBefore) {
				t.Fatalf("the other pod changed: %+v", now)
			}
			if res := runCLI(t, nil, attachArgs(r, p)...); res.code != 0 {
				t.Fatalf("attach after the crash: %s", res.output)
			}
			if res := runCLI(t, nil, "detach", "--pod-id", p.ID, "--bpffs", r.BPFFS); res.code != 0 {
				t.Fatalf("detach: %s", res.output)
			}
		})
	}
}

// legacyFilters counts the cls_bpf filters on the pod's eth0.
func legacyFilters(t *testing.T, p *topology.Pod) int {
	h := podHandle(t, p)
	eth, err := h.LinkByName(topology.PodIfName)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, _ := h.FilterList(eth, parent)
		n += len(fs)
	}
	return n
}

// Pods whose netns, interface or cgroup disappeared are removed by reconcile,
// with everything they had.
func TestReconcileRemovesGonePods(t *testing.T) {
	r := lifecycleRun(t)
	m, err := manager.New(manager.Options{BPFFS: r.BPFFS})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	keep := newPod(t, r)
	gone := map[string]func(p *topology.Pod){
		"netns deleted": func(p *topology.Pod) {
			if out, err := exec.Command("ip", "netns", "del", p.NetNS).CombinedOutput(); err != nil {
				t.Fatalf("%v %s", err, out)
			}
		},
		"veth deleted": func(p *topology.Pod) {
			if out, err := exec.Command("ip", "-n", p.NetNS, "link", "del", topology.PodIfName).CombinedOutput(); err != nil {
				t.Fatalf("%v %s", err, out)
			}
		},
		"cgroup removed": func(p *topology.Pod) {
			if err := os.Remove(p.PodCgroup); err != nil {
				t.Fatal(err)
			}
		},
	}
	pods := map[string]*topology.Pod{}
	for name := range gone {
		pods[name] = newPod(t, r)
	}
	for _, p := range append([]*topology.Pod{keep}, values(pods)...) {
		if _, err := m.AttachPod(ctx, podSpec(p)); err != nil {
			t.Fatal(err)
		}
	}
	entriesBefore := mapEntries(t, filepath.Join(r.BPFFS, "dp", "maps", "pods"))
	for name, kill := range gone {
		kill(pods[name])
	}
	list, err := m.Pods()
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range list {
		want := "defunct"
		if st.ID == keep.ID {
			want = "healthy"
		}
		if st.Health != want {
			t.Errorf("pod %s: %s (%s), want %s", st.ID, st.Health, st.Problem, want)
		}
	}
	rep, err := m.Reconcile(ctx, nil)
	if err != nil {
		t.Fatalf("reconcile: %v %+v", err, rep)
	}
	if len(rep.Detached) != len(gone) || len(rep.Kept) != 1 || rep.Kept[0] != keep.ID {
		t.Fatalf("reconcile report %+v", rep)
	}
	if n := mapEntries(t, filepath.Join(r.BPFFS, "dp", "maps", "pods")); n != entriesBefore-len(gone) {
		t.Fatalf("pod map entries %d, want %d", n, entriesBefore-len(gone))
	}
	for name, p := range pods {
		if pins := pinsUnder(t, filepath.Join(r.BPFFS, "pods", p.ID)); len(pins) != 0 {
			t.Errorf("%s: pins left: %v", name, pins)
		}
	}
	// A full reconcile with an empty live list detaches the rest.
	rep, err = m.Reconcile(ctx, []manager.Pod{})
	if err != nil || len(rep.Detached) != 1 {
		t.Fatalf("reconcile to nothing: %v %+v", err, rep)
	}
	if left := pinsUnder(t, r.BPFFS); len(left) != 0 {
		t.Fatalf("pins left after reconciling to no pods: %v", left)
	}
}

func values(m map[string]*topology.Pod) []*topology.Pod {
	var out []*topology.Pod
	for _, p := range m {
		out = append(out, p)
	}
	return out
}

func podSpec(p *topology.Pod) manager.Pod {
	return manager.Pod{ID: p.ID, Netns: p.NetNSPath(), Cgroup: p.PodCgroup, ProxyCgroup: p.ProxyCgrp}
}

// countState is everything of ours in the kernel and on bpffs.
type countState struct {
	pins, links, entries int
}

func countAll(t *testing.T, r *topology.Run) countState {
	t.Helper()
	s := countState{pins: len(pinsUnder(t, r.BPFFS)), links: len(ourLinks(t, r.BPFFS))}
	maps, _ := filepath.Glob(filepath.Join(r.BPFFS, "dp", "maps", "*"))
	for _, m := range maps {
		if strings.HasPrefix(filepath.Base(m), "sk_") { // socket storage: no keys to list
			continue
		}
		s.entries += mapEntries(t, m)
	}
	s.entries += mapEntries(t, filepath.Join(r.BPFFS, "pod_meta")) + mapEntries(t, filepath.Join(r.BPFFS, "pod_owners"))
	return s
}

// 1000 attach/detach cycles leave exactly what was there before.
func TestNoLeaksOverManyCycles(t *testing.T) {
	r := lifecycleRun(t)
	m, err := manager.New(manager.Options{BPFFS: r.BPFFS})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	anchor := newLivePod(t, r) // stays attached: the datapath stays loaded
	if _, err := m.AttachPod(ctx, anchor.spec()); err != nil {
		t.Fatal(err)
	}
	// Some traffic so that flows and counters exist for both pods.
	cyc := newLivePod(t, r)
	before := countAll(t, r)
	cycles := 1000
	if testing.Short() {
		cycles = 50
	}
	start := time.Now()
	for i := 0; i < cycles; i++ {
		if _, err := m.AttachPod(ctx, cyc.spec()); err != nil {
			t.Fatalf("cycle %d attach: %v", i, err)
		}
		if i%100 == 0 {
			if res, err := cyc.out(ctx, fmt.Sprintf("c%d", i), 0); err != nil || res.Outcome != standin.OutcomeOK {
				t.Fatalf("cycle %d: traffic failed: %v %+v", i, err, res)
			}
			if res, err := cyc.in(ctx, fmt.Sprintf("c%d", i), 0); err != nil || res.Outcome != standin.OutcomeOK {
				t.Fatalf("cycle %d: inbound traffic failed: %v %+v", i, err, res)
			}
		}
		if err := m.DetachPod(ctx, cyc.pod.ID); err != nil {
			t.Fatalf("cycle %d detach: %v", i, err)
		}
	}
	t.Logf("%d cycles in %v (%.1f ms per attach+detach)", cycles, time.Since(start), float64(time.Since(start).Milliseconds())/float64(cycles))
	after := countAll(t, r)
	if after != before {
		t.Fatalf("after %d cycles: %+v; before: %+v", cycles, after, before)
	}
	if before.links == 0 || before.pins == 0 || before.entries == 0 {
		t.Fatalf("nothing counted: %+v", before)
	}
}

// Two processes attaching and detaching the same pod at once never corrupt
// the state: the lock on the bpffs directory serialises them.
func TestConcurrentAttachDetach(t *testing.T) {
	r := lifecycleRun(t)
	p := newPod(t, r)
	for round := 0; round < 3; round++ {
		var wg sync.WaitGroup
		results := make([]cliResult, 8)
		for i := range results {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if i%2 == 0 {
					results[i] = runCLI(t, nil, attachArgs(r, p)...)
				} else {
					results[i] = runCLI(t, nil, "detach", "--pod-id", p.ID, "--bpffs", r.BPFFS)
				}
			}()
		}
		wg.Wait()
		for _, res := range results {
			if res.code != 0 && !strings.Contains(res.output, "not attached") {
				t.Fatalf("round %d: unexpected failure: %s", round, res.output)
			}
		}
		// Whatever the interleaving, the pod is now either fully attached and
		// healthy or fully gone.
		list := runCLI(t, nil, "list", "--bpffs", r.BPFFS)
		st := inspectPod(t, r, p)
		switch {
		case strings.Contains(list.output, p.ID):
			if !strings.Contains(list.output, "healthy") || len(st.pins) != podPins(t, 1) || st.ruleCount != 2 {
				t.Fatalf("round %d: attached but not whole: %s %+v", round, list.output, st)
			}
		default:
			if len(st.pins) != 0 || st.ruleCount != 0 {
				t.Fatalf("round %d: detached but debris left: %+v", round, st)
			}
		}
	}
	runCLI(t, nil, "detach", "--pod-id", p.ID, "--bpffs", r.BPFFS)
}

// An interface added to the pod after attach is refused inbound until the next
// reconcile (serve runs it periodically) captures it: inbound on it then goes
// through the proxy, as the reference's rules (which cover every interface)
// would send it.
func TestNewInterfaceCapturedByReconcile(t *testing.T) {
	r := lifecycleRun(t)
	lp := newLivePod(t, r)
	if res := runCLI(t, nil, attachArgs(r, lp.pod)...); res.code != 0 {
		t.Fatalf("attach: %s", res.output)
	}
	t.Cleanup(func() { runCLI(t, nil, "detach", "--pod-id", lp.pod.ID, "--bpffs", r.BPFFS) })
	// A second link between the pod and R, on another subnet.
	if err := lp.pod.AddSecondInterface(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dialNew := func(token string) standin.DialResult {
		res, err := lp.peer.Dial(ctx, standin.DialSpec{Proto: "tcp", Dst: "10.78.0.2:8080", Token: token})
		if err != nil || res.Outcome != standin.OutcomeOK {
			t.Fatalf("dial on the new interface: %v %+v", err, res)
		}
		return res
	}
	// Before reconcile the new interface has no tc programs: the pod's
	// cgroup_skb guard refuses the connection (fail closed) rather than let it
	// reach the application around the proxy.
	before, err := lp.peer.Dial(ctx, standin.DialSpec{Proto: "tcp", Dst: "10.78.0.2:8080", Token: "before", TimeoutMS: 500})
	if err != nil || before.Outcome == standin.OutcomeOK {
		t.Fatalf("inbound on an interface added after attach got through before reconcile: %v %+v", err, before)
	}
	if _, in := lp.proxied(ctx); in != 0 {
		t.Fatalf("captured before reconcile (%d relayed): the test is not testing the gap", in)
	}
	res := runCLI(t, nil, "reconcile", "--bpffs", r.BPFFS)
	if res.code != 0 || !strings.Contains(res.output, `"refreshed"`) {
		t.Fatalf("reconcile did not refresh the pod: %s", res.output)
	}
	dialNew("after")
	if _, in := lp.proxied(ctx); in != 1 {
		t.Fatalf("after reconcile, inbound on the new interface was not redirected to the proxy (%d relayed)", in)
	}
	// And the new address counts as the pod's own for outbound (rule 3).
	res = runCLI(t, nil, "explain", "--pod-id", lp.pod.ID, "--dst", "10.78.0.2:8080", "--bpffs", r.BPFFS)
	if !strings.Contains(res.output, "out-local") {
		t.Fatalf("the new address is not local to explain: %s", res.output)
	}
	if list := runCLI(t, nil, "list", "--bpffs", r.BPFFS); !strings.Contains(list.output, "healthy") {
		t.Fatalf("after refresh: %s", list.output)
	}
}

// serve watches each pod's namespace: an interface added to a running pod is
// captured within moments, without waiting for the periodic reconcile.
func TestServeCapturesNewInterfaceAtOnce(t *testing.T) {
	r := lifecycleRun(t)
	lp := newLivePod(t, r)
	sp := startServe(t, r) // prunes only every hour: only the watch can do it
	if code, body := sp.call(t, "POST", "/pods", lp.spec()); code != 200 {
		t.Fatalf("attach: %d %s", code, body)
	}
	t.Cleanup(func() { sp.call(t, "DELETE", "/pods/"+lp.pod.ID, nil) })
	sp.waitMetric(t, "ebpf_redirect_watched_pods 1") // the watch has subscribed
	// A second link between the pod and R, on another subnet.
	if err := lp.pod.AddSecondInterface(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	deadline := time.Now().Add(5 * time.Second)
	for {
		res, err := lp.peer.Dial(ctx, standin.DialSpec{Proto: "tcp", Dst: "10.78.0.2:8080", Token: "watch", TimeoutMS: 300})
		if err != nil {
			t.Fatal(err)
		}
		if res.Outcome == standin.OutcomeOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the new interface was not captured within 5 s: %+v\n%s", res, sp.out)
		}
	}
	if _, in := lp.proxied(ctx); in != 1 {
		t.Fatalf("the connection on the new interface did not go through the proxy (%d relayed)", in)
	}
	if _, body := sp.call(t, "GET", "/metrics", nil); !strings.Contains(body, "ebpf_redirect_refreshed_pods_total 1") {
		t.Errorf("refresh not counted:\n%s", grepLines(body, "refreshed"))
	}
}

// An IPv6 address the pod gains after attach (here its only global one, which
// must first finish duplicate address detection) is taken in by serve's watch
// once it is usable: it becomes the pod's IPv6 source and one of its own
// addresses (routed through lo, not redirected).
func TestServeTakesInAnAddressWhenDADFinishes(t *testing.T) {
	r := lifecycleRun(t)
	lp := newLivePod(t, r)
	ns := lp.pod.NetNS
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	// No global IPv6 address at attach.
	ip("ip", "-6", "addr", "del", "fd00:77::2/64", "dev", "eth0")
	ip("ip", "-6", "addr", "del", "fd00:77::3/64", "dev", "eth0")
	sp := startServe(t, r)
	if code, body := sp.call(t, "POST", "/pods", lp.spec()); code != 200 {
		t.Fatalf("attach: %d %s", code, body)
	}
	t.Cleanup(func() { sp.call(t, "DELETE", "/pods/"+lp.pod.ID, nil) })
	sp.waitMetric(t, "ebpf_redirect_watched_pods 1")
	if p, _ := listed(t, r, lp.pod.ID); p.PodIP6 != "" {
		t.Fatalf("the pod has an IPv6 source before it has an address: %q", p.PodIP6)
	}
	// With duplicate address detection: tentative for about a second.
	ip("sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=1", "net.ipv6.conf.eth0.dad_transmits=1")
	ip("ip", "-6", "addr", "add", "fd00:77::2/64", "dev", "eth0")
	explain := func() string {
		res := runCLI(t, nil, "explain", "--pod-id", lp.pod.ID, "--dst", "[fd00:77::2]:8080", "--json", "--bpffs", r.BPFFS)
		var d manager.Decision
		if err := json.Unmarshal([]byte(res.output), &d); err != nil {
			t.Fatalf("explain: %v: %s", err, res.output)
		}
		return d.Rule.Name
	}
	deadline := time.Now().Add(15 * time.Second)
	for explain() != "out-local" {
		if time.Now().After(deadline) {
			t.Fatalf("the address was not taken in once DAD finished:\n%s", sp.out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if p, _ := listed(t, r, lp.pod.ID); p.PodIP6 != "fd00:77::2" {
		t.Fatalf("the pod's IPv6 source is %q, want fd00:77::2", p.PodIP6)
	}
	// A redirected IPv6 connection now has the pod's address as its source.
	if _, err := lp.peer.Listen(context.Background(), standin.ListenSpec{Proto: "tcp", Addr: "[::]:80", V6Only: true}); err != nil {
		t.Fatal(err)
	}
	res, err := lp.app.Dial(context.Background(), standin.DialSpec{Proto: "tcp", Dst: "[fd00:77::1]:80", Token: "dad"})
	if err != nil || res.Outcome != standin.OutcomeOK || !strings.HasPrefix(res.Local, "[fd00:77::2]:") {
		t.Fatalf("after DAD: %v %+v", err, res)
	}
	if _, body := sp.call(t, "GET", "/metrics", nil); !strings.Contains(body, "ebpf_redirect_refreshed_pods_total") {
		t.Errorf("no refresh counted")
	}
}
