package test

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/redirect"
	"github.com/ebpf-redirect/ebpf-redirect/manager"
)

// The Go API refuses what the CLI refuses, with an error naming the problem,
// and leaves nothing behind: no pins, no map entries, no route, no other pod
// touched. (A pod id with NUL can only be tested here: an argv cannot carry a
// NUL byte.)
func TestBadInputIsRefusedByTheAPI(t *testing.T) {
	bf := newBadInputFixture(t, "removed-cgroup-api")
	r, good, other, goodBefore, regular, removed := bf.r, bf.good, bf.other, bf.goodBefore, bf.regular, bf.removed
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()

	pod := func(mod func(*manager.Pod)) manager.Pod {
		p := manager.Pod{ID: other.ID, Netns: other.NetNSPath(), Cgroup: other.PodCgroup, ProxyCgroup: other.ProxyCgrp}
		mod(&p)
		return p
	}
	opts := func(mod func(*manager.Options)) manager.Options {
		cfg := config.Default()
		o := manager.Options{BPFFS: r.BPFFS, Config: &cfg}
		mod(&o)
		return o
	}
	same := func(*manager.Options) {}
	samePod := func(*manager.Pod) {}
	type apiCase struct {
		name string
		ctx  context.Context
		o    manager.Options
		p    manager.Pod
		want string
	}
	// A port above 65535 cannot be expressed here: Config's ports are uint16.
	cases := []apiCase{
		{"pod id empty", nil, opts(same), pod(func(p *manager.Pod) { p.ID = "" }), "pod id is empty"},
		{"pod id too long", nil, opts(same), pod(func(p *manager.Pod) { p.ID = strings.Repeat("p", 64) }), "at most 63"},
		{"pod id with slash", nil, opts(same), pod(func(p *manager.Pod) { p.ID = "a/b" }), "pod id"},
		{"pod id dotdot", nil, opts(same), pod(func(p *manager.Pod) { p.ID = ".." }), "pod id"},
		{"pod id with NUL", nil, opts(same), pod(func(p *manager.Pod) { p.ID = "pod\x00x" }), "NUL"},
		{"pod id with space", nil, opts(same), pod(func(p *manager.Pod) { p.ID = "a b" }), "pod id"},
		{"missing netns", nil, opts(same), pod(func(p *manager.Pod) { p.Netns = "/run/netns/erd-api-missing" }), "no such file"},
		{"netns is a regular file", nil, opts(same), pod(func(p *manager.Pod) { p.Netns = regular }), "not a network namespace"},
		{"netns empty", nil, opts(same), pod(func(p *manager.Pod) { p.Netns = "" }), "no netns path"},
		{"cgroup is not a cgroup", nil, opts(same), pod(func(p *manager.Pod) { p.Cgroup = t.TempDir() }), "not on a cgroup v2"},
		{"root cgroup", nil, opts(same), pod(func(p *manager.Pod) { p.Cgroup = r.CgroupFS }), "root cgroup"},
		{"removed cgroup", nil, opts(same), pod(func(p *manager.Pod) { p.Cgroup = removed }), "no such file"},
		{"proxy cgroup is the pod's", nil, opts(same), pod(func(p *manager.Pod) { p.ProxyCgroup = p.Cgroup }), "proxy must run outside"},
		{"bpffs not mounted", nil, opts(func(o *manager.Options) { o.BPFFS = filepath.Join(t.TempDir(), "erd") }), pod(samePod), "not on a bpf filesystem"},
		{"port zero", nil, opts(func(o *manager.Options) { o.Config.InboundPort = 0 }), pod(samePod), "inbound port must be 1-65535"},
		{"mark zero", nil, opts(func(o *manager.Options) { o.Config.ConnMark = 0 }), pod(samePod), "connection mark must not be 0"},
		{"mask hides the mark", nil, opts(func(o *manager.Options) { o.Config.MarkMask = 0x0ff }), pod(samePod), "outside the mark mask"},
		{"a different config than the node's", nil, opts(func(o *manager.Options) { o.Config.HBONEPort = 15009 }), pod(samePod), "different config"},
		{"double attach", nil, opts(same), manager.Pod{ID: good.ID, Netns: good.NetNSPath(), Cgroup: good.PodCgroup}, "already attached"},
		{"same netns as another pod", nil, opts(same), pod(func(p *manager.Pod) { p.Netns = good.NetNSPath() }), "already attached as pod"},
		{"interrupted before it starts", cancelled, opts(same), pod(samePod), "context canceled"},
	}
	// cgroup v1 is only there on hybrid hosts.
	for _, v1 := range []string{"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/memory"} {
		var fs unix.Statfs_t
		if unix.Statfs(v1, &fs) == nil && fs.Type == unix.CGROUP_SUPER_MAGIC {
			cases = append(cases, apiCase{"cgroup v1 path", nil, opts(same), pod(func(p *manager.Pod) { p.Cgroup = v1 }), "cgroup v1"})
			break
		}
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := tc.ctx
			if ctx == nil {
				ctx = context.Background()
			}
			m, err := manager.New(tc.o)
			if err == nil {
				_, err = m.AttachPod(ctx, tc.p)
			}
			if err == nil {
				t.Fatalf("Attach accepted it")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error does not name the problem: want %q in %q", tc.want, err)
			}
			if st := inspectPod(t, r, other); len(st.pins) != 0 || st.ruleCount != 0 || st.podEntries != goodBefore.podEntries {
				t.Fatalf("refused attach left state behind: %+v", st)
			}
			if now := inspectPod(t, r, good); !equalState(now, goodBefore) {
				t.Fatalf("attached pod changed: %+v, was %+v", now, goodBefore)
			}
		})
	}
	t.Run("detach of an unknown pod", func(t *testing.T) {
		err := redirect.Detach(context.Background(), redirect.Options{Root: r.BPFFS}, "erd-never-attached")
		if !errors.Is(err, redirect.ErrNotAttached) {
			t.Fatalf("got %v, want ErrNotAttached", err)
		}
	})
	t.Run("detach with a bad pod id", func(t *testing.T) {
		err := redirect.Detach(context.Background(), redirect.Options{Root: r.BPFFS}, "../"+good.ID)
		if err == nil || !strings.Contains(err.Error(), "pod id") {
			t.Fatalf("got %v", err)
		}
		if now := inspectPod(t, r, good); !equalState(now, goodBefore) {
			t.Fatalf("attached pod changed: %+v, was %+v", now, goodBefore)
		}
	})
}

// A pod id with NUL cannot even reach the CLI: the kernel takes argv as C
// strings. Go's exec refuses to start it, so there is no way for a node agent to
// pass one by mistake.
func TestNULPodIDCannotReachTheCLI(t *testing.T) {
	err := exec.Command("/bin/true", "--pod-id", "a\x00b").Run()
	if err == nil {
		t.Fatal("an argument with NUL was passed to a process")
	}
}

// SIGINT or SIGTERM during attach unwinds it: whenever the signal lands, the
// command either finished (exit 0, the pod attached: detached again here) or
// failed (non-zero) leaving nothing of the pod behind, and the other pod is as
// it was.
func TestSignalDuringAttachUnwinds(t *testing.T) {
	r := lifecycleRun(t)
	good := newPod(t, r)
	if res := runCLI(t, nil, attachArgs(r, good)...); res.code != 0 {
		t.Fatalf("attach failed: %s", res.output)
	}
	t.Cleanup(func() { runCLI(t, nil, "detach", "--pod-id", good.ID, "--bpffs", r.BPFFS) })
	goodBefore := inspectPod(t, r, good)
	bin := ebpfBinary(t)

	// How long an attach takes here, to spread the signals over it.
	probe := newPod(t, r)
	start := time.Now()
	if res := runCLI(t, nil, attachArgs(r, probe)...); res.code != 0 {
		t.Fatalf("attach failed: %s", res.output)
	}
	took := time.Since(start)
	if res := runCLI(t, nil, "detach", "--pod-id", probe.ID, "--bpffs", r.BPFFS); res.code != 0 {
		t.Fatalf("detach failed: %s", res.output)
	}

	interrupted, finished := 0, 0
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		// From before the handler is installed to after the attach is done.
		for i := 0; i <= 12; i++ {
			delay := took * time.Duration(i) / 8
			t.Run(fmt.Sprintf("%v after %v", sig, delay.Round(time.Millisecond)), func(t *testing.T) {
				p := newPod(t, r)
				before := inspectPod(t, r, p)
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				defer cancel()
				cmd := exec.CommandContext(ctx, bin, append(attachArgs(r, p), "--log-level", "debug")...)
				var out strings.Builder
				cmd.Stdout, cmd.Stderr = &out, &out
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				time.Sleep(delay)
				_ = cmd.Process.Signal(sig)
				err := cmd.Wait()
				switch {
				case err == nil:
					// It finished before the signal was handled: attached in full.
					finished++
					if st := inspectPod(t, r, p); st.ruleCount != 2 || len(st.pins) != podPins(t, 1) {
						t.Fatalf("exit 0 but not attached: %+v\n%s", st, out.String())
					}
					if res := runCLI(t, nil, "detach", "--pod-id", p.ID, "--bpffs", r.BPFFS); res.code != 0 {
						t.Fatalf("detach: %s", res.output)
					}
				default:
					if strings.Contains(out.String(), "interrupted") || strings.Contains(out.String(), "context canceled") {
						interrupted++
					}
					if after := inspectPod(t, r, p); len(after.pins) != 0 || after.ruleCount != before.ruleCount || after.sysctls != before.sysctls {
						t.Fatalf("interrupted attach left state: %+v, before %+v\n%s", after, before, out.String())
					}
					if res := runCLI(t, nil, "list", "--bpffs", r.BPFFS); strings.Contains(res.output, p.ID) {
						t.Fatalf("interrupted attach left a record: %s", res.output)
					}
				}
				if now := inspectPod(t, r, good); !equalState(now, goodBefore) {
					t.Fatalf("attached pod changed: %+v, was %+v", now, goodBefore)
				}
			})
		}
	}
	if interrupted == 0 {
		t.Errorf("no signal landed during an attach step: the unwinding on a signal was not exercised (attach took %v)", took)
	}
	t.Logf("%d attaches unwound by a signal, %d finished first (attach takes %v)", interrupted, finished, took)
}
