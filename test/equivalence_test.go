// The differential test suite: every case of internal/equiv runs in fresh pods under
// the reference ruleset (iptables-restore + inpod-routes.sh) and under ebpf-redirect,
// and the records of what every party saw must be identical.
//
// Run everything (as root):          go test ./test/
// The reference alone, every case:    go test ./test/ -run TestEquivIptables -v
// One case, both backends:            go test ./test/ -run 'TestEquivalence/^in-app-port$' -v
package test

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/equiv"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/privtest"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/reference"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/topology"
)

// sharedReference is the oracle's original, beside the repository.
const sharedReference = "../../shared/reference"

func TestMain(m *testing.M) {
	// The agents are this test binary re-executed with EBPF_REDIRECT_ROLE set.
	standin.MaybeRunRole()
	code := m.Run()
	if testRun != nil {
		if err := testRun.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "teardown:", err)
			code = 1
		}
	}
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

var (
	runOnce sync.Once
	testRun *topology.Run
	runErr  error

	binDirOnce sync.Once
	binDir     string
	binDirErr  error
	builds     sync.Map // build tags -> *build
)

// build is one compiled CLI.
type build struct {
	once sync.Once
	path string
	err  error
}

// runner returns the Runner shared by the whole test binary (one topology.Run, one
// bpffs), or skips when the machine lacks what it needs.
func runner(t *testing.T) *equiv.Runner {
	t.Helper()
	privtest.Require(t, "iptables-restore", "ip6tables-restore")
	runOnce.Do(func() { testRun, runErr = topology.NewRun() })
	if runErr != nil {
		t.Fatal(runErr)
	}
	return &equiv.Runner{Run: testRun}
}

func referenceBackend(t *testing.T) *equiv.Iptables {
	t.Helper()
	dir := sharedReference
	if _, err := os.Stat(dir); err != nil {
		t.Logf("no %s: using the embedded copy of the reference", dir)
		dir = ""
	}
	b, err := equiv.NewIptables(dir)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ebpfBinary builds the product CLI once: exactly what ships.
func ebpfBinary(t *testing.T) string { return cliBuild(t, "") }

// faultBinary builds the CLI with the fault seams (-tags faultinject):
// EBPF_REDIRECT_FAULT_BEFORE and EBPF_REDIRECT_CRASH_BEFORE, which the
// product does not have.
func faultBinary(t *testing.T) string { return cliBuild(t, "faultinject") }

// Names of the variables the faultinject build reads.
const (
	faultEnv = "EBPF_REDIRECT_FAULT_BEFORE"
	crashEnv = "EBPF_REDIRECT_CRASH_BEFORE"
)

func cliBuild(t *testing.T, tags string) string {
	t.Helper()
	v, _ := builds.LoadOrStore(tags, &build{})
	b := v.(*build)
	b.once.Do(func() {
		binDirOnce.Do(func() { binDir, binDirErr = os.MkdirTemp("", "ebpf-redirect-test-bin") })
		if b.err = binDirErr; b.err != nil {
			return
		}
		name := "ebpf-redirect"
		if tags != "" {
			name += "-" + tags
		}
		b.path = filepath.Join(binDir, name)
		goTool, err := exec.LookPath("go")
		if err != nil {
			goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, goTool, "build", "-tags", tags, "-o", b.path, "../cmd/ebpf-redirect").CombinedOutput()
		if err != nil {
			b.err = fmt.Errorf("go build -tags %q: %v\n%s", tags, err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

func TestEmbeddedReferenceMatchesShared(t *testing.T) {
	shared, err := filepath.Glob(filepath.Join(sharedReference, "inpod-*"))
	if err != nil {
		t.Fatal(err)
	}
	if len(shared) == 0 {
		t.Skipf("%s not present: nothing to compare the embedded copy with", sharedReference)
	}
	var names []string
	for _, path := range shared {
		name := filepath.Base(path)
		names = append(names, name)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(reference.Names(), name) {
			t.Errorf("internal/lab/reference lacks %s: copy it", name)
			continue
		}
		if !bytes.Equal(b, reference.File(name)) {
			t.Errorf("internal/lab/reference/%s differs from %s: copy it again", name, path)
		}
	}
	for _, name := range reference.Names() {
		if !slices.Contains(names, name) {
			t.Errorf("internal/lab/reference/%s is not in %s any more", name, sharedReference)
		}
	}
	for _, doc := range []struct{ shared, ours string }{{"README.md", "../docs/reference.md"}, {"KERNEL-NOTES.md", "../docs/kernel-notes.md"}} {
		a, err1 := os.ReadFile(filepath.Join(sharedReference, doc.shared))
		b, err2 := os.ReadFile(doc.ours)
		if err1 == nil && (err2 != nil || !bytes.Equal(a, b)) {
			t.Errorf("%s differs from %s/%s: copy it again", doc.ours, sharedReference, doc.shared)
		}
	}
}

// allReference makes TestEquivIptables run every case, not a sample:
// go test ./test/ -run TestEquivIptables -all-reference
var allReference = flag.Bool("all-reference", false, "TestEquivIptables: run every case twice under the reference, not every 4th")

// TestEquivIptables runs cases twice under the reference alone: each must land where
// the case says, and the two records must be identical (the harness itself is
// deterministic, so any difference under ebpf-redirect is ebpf-redirect's). Every case
// already runs once under the reference in TestEquivalence, which checks where it
// lands; this second look at the harness takes every 4th case by default (both
// families and every kind of case among them), every case with -all-reference.
func TestEquivIptables(t *testing.T) {
	r := runner(t)
	ref := referenceBackend(t)
	for i, c := range equiv.AllCases() {
		if !*allReference && i%4 != 0 {
			continue
		}
		t.Run(c.Name, func(t *testing.T) {
			skipUnavailable(t, c)
			o, err := r.RunPair(context.Background(), c, ref, ref)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s\n%s", c.Description, o.Reference)
			if o.ExpectErr != nil {
				t.Error(o.ExpectErr)
			}
			if o.Diff != "" {
				t.Errorf("two runs under the reference differ:\n%s", o.Diff)
			}
		})
	}
}

// TestEquivalence runs every case under both backends and compares the records.
func TestEquivalence(t *testing.T) {
	r := runner(t)
	ref := referenceBackend(t)
	cand := &equiv.Ebpf{Binary: ebpfBinary(t)}
	for _, c := range equiv.AllCases() {
		t.Run(c.Name, func(t *testing.T) {
			skipUnavailable(t, c)
			o, err := r.RunPair(context.Background(), c, ref, cand)
			if err != nil {
				t.Fatal(err)
			}
			switch perr := o.Problem(); {
			case perr != nil:
				t.Errorf("%s\n%v", c.Description, perr)
			case c.KnownDifference != "":
				t.Logf("KNOWN DIFFERENCE: %s\nwhy: %s\n%s", c.Description, c.KnownDifference, o.Diff)
			default:
				t.Logf("%s\n%s", c.Description, o.Reference)
			}
		})
	}
}

// skipUnavailable skips a case the kernel cannot run (io_uring disabled by
// sysctl or seccomp, no MPTCP), saying why: there is nothing to compare, the
// reference could not make the connection either.
func skipUnavailable(t *testing.T, c equiv.Case) {
	t.Helper()
	if why := c.Unavailable(); why != "" {
		t.Skipf("case needs %s: %s", c.Requires, why)
	}
}

// TestEquivalenceDetectsMutation proves the suite can fail: ebpf-redirect told that
// probes come from the wrong address must be caught by the probe case.
func TestEquivalenceDetectsMutation(t *testing.T) {
	r := runner(t)
	ref := referenceBackend(t)
	mutant := &equiv.Ebpf{Binary: ebpfBinary(t), ExtraArgs: []string{"--probe-addr", "169.254.7.128"}}
	c, ok := equiv.CaseByName("in-probe-source")
	if !ok {
		t.Fatal("case in-probe-source is gone")
	}
	o, err := r.RunPair(context.Background(), c, ref, mutant)
	if err != nil {
		t.Fatal(err)
	}
	if o.Diff == "" {
		t.Fatalf("a mutant with --probe-addr 169.254.7.128 went unnoticed; both recorded:\n%s", o.Reference)
	}
	if !strings.Contains(o.Diff, "landing:") {
		t.Logf("the mutant differs, but not in where the connection landed")
	}
	t.Logf("the mutant is caught:\n%s", o.Diff)
}

// TestDemo runs the CLI's demo entry point on a few cases: a table, every case the
// same, and an error (with the diff) when ebpf-redirect is wrong.
func TestDemo(t *testing.T) {
	runner(t) // privileges
	bin := ebpfBinary(t)
	var out bytes.Buffer
	err := equiv.RunDemo(&out, equiv.DemoOptions{Binary: bin, Cases: []string{"out-peer-http", "in-app-port"}})
	t.Logf("demo:\n%s", out.String())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"CASE", "out-peer-http", "proxy:15001>peer:80", "in-app-port", "all 2 cases equivalent"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}

	out.Reset()
	err = equiv.RunDemo(&out, equiv.DemoOptions{Binary: bin, Cases: []string{"in-probe-source"},
		ExtraAttachArgs: []string{"--probe-addr", "169.254.7.128"}})
	t.Logf("mutated demo:\n%s", out.String())
	if err == nil || !strings.Contains(out.String(), "NO") || !strings.Contains(out.String(), "+ landing:") {
		t.Fatalf("the mutated demo did not report the difference (err=%v)", err)
	}
}

// TestEquivalenceDetectsMutation6 proves the IPv6 half can fail: told that
// IPv6 probes come from another address, ebpf-redirect is caught by the IPv6
// probe cases.
func TestEquivalenceDetectsMutation6(t *testing.T) {
	r := runner(t)
	ref := referenceBackend(t)
	// Another node config: its own bpffs.
	run, err := topology.NewRun()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { run.Close() })
	r = &equiv.Runner{Run: run, AgentExe: r.AgentExe}
	mutant := &equiv.Ebpf{Binary: ebpfBinary(t), ExtraArgs: []string{"--probe-addr6", "fd16:9254:7127:1337::1"}}
	for _, name := range []string{"in6-probe-source", "out6-probe-address"} {
		c, ok := equiv.CaseByName(name)
		if !ok {
			t.Fatalf("case %s is gone", name)
		}
		o, err := r.RunPair(context.Background(), c, ref, mutant)
		if err != nil {
			t.Fatal(err)
		}
		if o.Diff == "" {
			t.Fatalf("%s: a mutant with another IPv6 probe address went unnoticed; both recorded:\n%s", name, o.Reference)
		}
		t.Logf("%s: the mutant is caught:\n%s", name, o.Diff)
	}
}

// TestEquivalenceIPv6Off: with --ipv6=false, IPv6 is untouched, as under the
// IPv4 ruleset alone (no ip6tables rules): the IPv6 cases land where the
// reference without its IPv6 twin sends them, and the IPv4 ones still go
// through the proxy.
func TestEquivalenceIPv6Off(t *testing.T) {
	runner(t)
	ref := referenceBackend(t)
	ref.Rules6, ref.Routes6 = nil, nil
	run, err := topology.NewRun()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { run.Close() })
	r := &equiv.Runner{Run: run}
	cand := &equiv.Ebpf{Binary: ebpfBinary(t), ExtraArgs: []string{"--ipv6=false"}}
	for name, landing := range map[string]string{
		"out6-peer-http":            "peer:80",
		"in6-app-port":              "app:8080",
		"out6-self-call-15001":      "proxy:15001>self-call-refused",
		"out-peer-http":             "proxy:15001>peer:80",
		"in-app-port":               "proxy:15006>app:8080",
		"out-v4-mapped-ipv6-socket": "proxy:15001>peer:80",
	} {
		t.Run(name, func(t *testing.T) {
			c, ok := equiv.CaseByName(name)
			if !ok {
				t.Fatalf("case %s is gone", name)
			}
			c.Expect = landing
			o, err := r.RunPair(context.Background(), c, ref, cand)
			if err != nil {
				t.Fatal(err)
			}
			if err := o.Problem(); err != nil {
				t.Fatal(err)
			}
		})
	}
}
