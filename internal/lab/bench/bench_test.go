package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/privtest"
)

// The bench runs end to end through the CLI, with tiny runs, and prints well-formed
// JSON: every workload under every backend, finite numbers, eBPF program statistics,
// nf_conntrack_max put back. Nothing here depends on how fast anything was.
func TestBenchQuickJSON(t *testing.T) {
	privtest.Require(t, "iptables-restore")
	ctMaxBefore, _ := os.ReadFile(conntrackMaxPath)

	// The lab finds the product beside itself, as `make build` puts them.
	dir := t.TempDir()
	bin := filepath.Join(dir, "ebpf-redirect-lab")
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	if out, err := exec.Command(goTool, "build", "-o", dir+"/", "../../../cmd/ebpf-redirect", "../../../cmd/ebpf-redirect-lab").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "bench", "--json", "--quiet", "--reps", "2", "--duration", "100ms",
		"--pressure-duration", "200ms", "--warmup", "50ms", "--timeout", "1s")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("bench: %v\nstderr:\n%s", err, stderr.String())
	}

	var rep Report
	dec := json.NewDecoder(&stdout)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rep); err != nil {
		t.Fatalf("output is not a report: %v", err)
	}
	if rep.Meta.Kernel == "" || rep.Meta.CPU == "" || rep.Meta.Date == "" || rep.Meta.Go == "" || rep.Meta.CPUs == 0 {
		t.Errorf("meta incomplete: %+v", rep.Meta)
	}
	var names []string
	for _, w := range rep.Workloads {
		names = append(names, w.Name)
		var backends []string
		for _, b := range w.Backends {
			backends = append(backends, b.Backend)
			if len(b.Samples) != 2 {
				t.Errorf("%s/%s: %d samples, want 2", w.Name, b.Backend, len(b.Samples))
			}
			for _, s := range b.Samples {
				if s.Ops <= 0 || s.ElapsedS <= 0 {
					t.Errorf("%s/%s rep %d: ops %d elapsed %g", w.Name, b.Backend, s.Rep, s.Ops, s.ElapsedS)
				}
				if b.Backend != None && s.Captured != 1 {
					t.Errorf("%s/%s rep %d: captured %g", w.Name, b.Backend, s.Rep, s.Captured)
				}
			}
			for _, m := range metricsFor(w.w0()) {
				if sm, ok := b.Summary[m.Key]; !ok || sm.N == 0 {
					t.Errorf("%s/%s: no summary of %s", w.Name, b.Backend, m.Key)
				}
			}
		}
		if !slices.Equal(backends, Backends) {
			t.Errorf("%s: backends %v", w.Name, backends)
		}
		if len(w.Ratios) == 0 {
			t.Errorf("%s: no ratios", w.Name)
		}
		if w.BPF["pod_egress"].RunCnt == 0 {
			t.Errorf("%s: no run count for pod_egress: %+v", w.Name, w.BPF)
		}
	}
	if !slices.Equal(names, WorkloadNames()) {
		t.Errorf("workloads %v, want %v", names, WorkloadNames())
	}
	if rep.Generator == nil || rep.Generator.DirectRate.N != 2 {
		t.Errorf("generator check: %+v", rep.Generator)
	}
	if len(rep.Targets) != 10 {
		t.Errorf("%d targets", len(rep.Targets))
	}
	for _, tg := range rep.Targets {
		if tg.Status != "met" && tg.Status != "missed" {
			t.Errorf("target %s %s: %s", tg.Goal, tg.Workload, tg.Status)
		}
	}
	checkFinite(t, "report", reflect.ValueOf(rep))

	if after, _ := os.ReadFile(conntrackMaxPath); !bytes.Equal(after, ctMaxBefore) {
		t.Errorf("nf_conntrack_max %q after the bench, %q before", after, ctMaxBefore)
	}
}

// checkFinite walks v and fails on any NaN or infinite float.
func checkFinite(t *testing.T, path string, v reflect.Value) {
	t.Helper()
	switch v.Kind() {
	case reflect.Float32, reflect.Float64:
		if f := v.Float(); math.IsNaN(f) || math.IsInf(f, 0) {
			t.Errorf("%s = %v", path, f)
		}
	case reflect.Pointer, reflect.Interface:
		if !v.IsNil() {
			checkFinite(t, path, v.Elem())
		}
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if v.Type().Field(i).IsExported() {
				checkFinite(t, path+"."+v.Type().Field(i).Name, v.Field(i))
			}
		}
	case reflect.Slice, reflect.Array:
		for i := 0; i < v.Len(); i++ {
			checkFinite(t, path, v.Index(i))
		}
	case reflect.Map:
		for _, k := range v.MapKeys() {
			checkFinite(t, path+"["+k.String()+"]", v.MapIndex(k))
		}
	}
}
