// Package scale measures what attaching pods costs at 1, 100 and 1000 pods,
// under ebpf-redirect (loaded once per node, attached the way a node agent
// does, through the manager API) and under the reference ruleset
// (iptables-restore and the policy route in every pod's namespace): time per
// pod, total, and the kernel memory it takes.
package scale

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/equiv"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
	"github.com/ebpf-redirect/ebpf-redirect/manager"
)

// Point is one backend at one pod count.
type Point struct {
	Backend string    `json:"backend"`
	Pods    int       `json:"pods"`
	Each    []float64 `json:"-"` // ms per pod, in attach order
	FirstMS float64   `json:"first_ms"`
	// SecondMS is the second pod: the first one of ebpf-redirect also loads
	// the programs.
	SecondMS float64 `json:"second_ms"`
	MedianMS float64 `json:"median_ms"`
	P99MS    float64 `json:"p99_ms"`
	LastMS   float64 `json:"last_ms"`
	TotalS   float64 `json:"total_s"`
	// BPFMemlockKB: what the kernel accounts to our programs and maps
	// (fdinfo memlock), ebpf only.
	BPFMemlockKB float64 `json:"bpf_memlock_kb,omitempty"`
	// KernelDeltaKB: Slab + Percpu + VmallocUsed from /proc/meminfo, after
	// minus before applying the backend to pods that already exist.
	KernelDeltaKB float64 `json:"kernel_delta_kb"`
}

// Result is a whole run.
type Result struct {
	Kernel, CPU, Date, Go string
	Points                []Point
}

// Run measures each size under both backends, in fresh pods each time, and
// removes everything it made.
func Run(ctx context.Context, sizes []int, progress io.Writer) (Result, error) {
	res := Result{Kernel: kernel(), CPU: cpuModel(), Date: time.Now().UTC().Format(time.RFC3339), Go: runtime.Version()}
	for _, n := range sizes {
		for _, b := range []string{"iptables", "ebpf"} {
			p, err := measure(ctx, b, n, progress)
			if err != nil {
				return res, fmt.Errorf("%s at %d pods: %w", b, n, err)
			}
			res.Points = append(res.Points, p)
			fmt.Fprintf(progress, "%-8s %5d pods: first %.1f ms, 2nd %.1f ms, median %.1f ms, last %.1f ms, total %.2f s, kernel +%.0f KiB\n",
				b, n, p.FirstMS, p.SecondMS, p.MedianMS, p.LastMS, p.TotalS, p.KernelDeltaKB)
		}
	}
	return res, nil
}

func measure(ctx context.Context, backend string, n int, progress io.Writer) (pt Point, err error) {
	pt = Point{Backend: backend, Pods: n}
	run, err := topology.NewRun()
	if err != nil {
		return pt, err
	}
	defer func() {
		if cerr := run.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	pods := make([]*topology.Pod, 0, n)
	for i := 0; i < n; i++ {
		p, err := run.NewPod()
		if err != nil {
			return pt, err
		}
		pods = append(pods, p)
		if (i+1)%200 == 0 {
			fmt.Fprintf(progress, "  %s: %d/%d pods built\n", backend, i+1, n)
		}
	}
	settle()
	before := kernelKB()
	var apply func(*topology.Pod) error
	var m *manager.Manager
	switch backend {
	case "iptables":
		ipt, err := equiv.NewIptables("")
		if err != nil {
			return pt, err
		}
		apply = func(p *topology.Pod) error { return ipt.Apply(ctx, run, p) }
	case "ebpf":
		m, err = manager.New(manager.Options{BPFFS: run.BPFFS, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			return pt, err
		}
		defer func() {
			if _, rerr := m.Reconcile(context.Background(), []manager.Pod{}); rerr != nil && err == nil {
				err = rerr
			}
		}()
		apply = func(p *topology.Pod) error {
			_, err := m.AttachPod(ctx, manager.Pod{ID: p.ID, Netns: p.NetNSPath(), Cgroup: p.PodCgroup, ProxyCgroup: p.ProxyCgrp})
			return err
		}
	}
	start := time.Now()
	for i, p := range pods {
		t0 := time.Now()
		if err := apply(p); err != nil {
			return pt, fmt.Errorf("pod %d: %w", i, err)
		}
		pt.Each = append(pt.Each, float64(time.Since(t0).Microseconds())/1000)
	}
	pt.TotalS = time.Since(start).Seconds()
	settle()
	pt.KernelDeltaKB = kernelKB() - before
	if m != nil {
		pt.BPFMemlockKB, err = memlockKB(run.BPFFS)
		if err != nil {
			return pt, err
		}
	}
	pt.FirstMS, pt.LastMS = pt.Each[0], pt.Each[len(pt.Each)-1]
	if len(pt.Each) > 1 {
		pt.SecondMS = pt.Each[1]
	}
	sorted := append([]float64(nil), pt.Each...)
	sort.Float64s(sorted)
	pt.MedianMS = sorted[len(sorted)/2]
	pt.P99MS = sorted[(len(sorted)*99)/100]
	return pt, nil
}

// settle lets deferred kernel frees (RCU) happen before a memory reading.
func settle() {
	runtime.GC()
	time.Sleep(500 * time.Millisecond)
}

func kernelKB() float64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	var sum float64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		switch fields[0] {
		case "Slab:", "Percpu:", "VmallocUsed:":
			v, _ := strconv.ParseFloat(fields[1], 64)
			sum += v
		}
	}
	return sum
}

// memlockKB sums fdinfo memlock over every pinned program and map of ours.
func memlockKB(root string) (float64, error) {
	dp, err := datapath.Open(filepath.Join(root, "dp"), nil, datapath.Options{})
	if err != nil {
		return 0, err
	}
	defer dp.Close()
	progs, maps := dp.Objects()
	var fds []int
	for _, p := range progs {
		fds = append(fds, p.FD())
	}
	for _, m := range maps {
		fds = append(fds, m.FD())
	}
	for _, name := range []string{"pod_meta", "pod_owners"} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(root, name), nil)
		if err != nil {
			return 0, err
		}
		defer m.Close()
		fds = append(fds, m.FD())
	}
	var total float64
	for _, fd := range fds {
		b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", fd))
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "memlock:"); ok {
				n, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
				total += n / 1024
			}
		}
	}
	return total, nil
}

func kernel() string {
	var u [3]string
	for i, f := range []string{"ostype", "osrelease", "version"} {
		b, _ := os.ReadFile("/proc/sys/kernel/" + f)
		u[i] = strings.TrimSpace(string(b))
	}
	return strings.Join(u[:2], " ") + " " + u[2]
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	n := 0
	model := ""
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "processor") {
			n++
		}
		if v, ok := strings.CutPrefix(line, "model name"); ok && model == "" {
			model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
		}
	}
	return fmt.Sprintf("%s (%d CPUs)", model, n)
}

// Markdown renders the result as the table in docs/scale.md.
func (r Result) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Measured %s on `%s`, %s, %s.\n\n", r.Date, r.Kernel, r.CPU, r.Go)
	fmt.Fprintln(&b, "| backend | pods | 1st pod ms | 2nd pod ms | median ms | p99 ms | last pod ms | total s | kernel memory Δ (Slab+Percpu+Vmalloc) | BPF memlock (progs+maps) |")
	fmt.Fprintln(&b, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, p := range r.Points {
		ml := "–"
		if p.BPFMemlockKB > 0 {
			ml = fmt.Sprintf("%.0f KiB", p.BPFMemlockKB)
		}
		fmt.Fprintf(&b, "| %s | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f | %.0f KiB | %s |\n",
			p.Backend, p.Pods, p.FirstMS, p.SecondMS, p.MedianMS, p.P99MS, p.LastMS, p.TotalS, p.KernelDeltaKB, ml)
	}
	return b.String()
}
