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
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ebpf-redirect/ebpf-redirect/internal/equiv"
	"github.com/ebpf-redirect/ebpf-redirect/internal/privtest"
	"github.com/ebpf-redirect/ebpf-redirect/internal/reference"
	"github.com/ebpf-redirect/ebpf-redirect/internal/standin"
	"github.com/ebpf-redirect/ebpf-redirect/internal/topology"
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

	buildOnce sync.Once
	binDir    string
	binPath   string
	binSkip   string
	binErr    error
)

// runner returns the Runner shared by the whole test binary (one topology.Run, one
// bpffs), or skips when the machine lacks what it needs.
func runner(t *testing.T) *equiv.Runner {
	t.Helper()
	privtest.Require(t, "iptables-restore")
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

// ebpfBinary builds the CLI once. It skips only while cmd/ebpf-redirect does not exist
// yet; a CLI that exists and does not build is a failure.
func ebpfBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		src := "../cmd/ebpf-redirect"
		if gos, _ := filepath.Glob(filepath.Join(src, "*.go")); len(gos) == 0 {
			binSkip = "cmd/ebpf-redirect does not exist yet: nothing to compare with the reference"
			return
		}
		if binDir, binErr = os.MkdirTemp("", "ebpf-redirect-test-bin"); binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "ebpf-redirect")
		goTool, err := exec.LookPath("go")
		if err != nil {
			goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, goTool, "build", "-o", binPath, src).CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build %s: %v\n%s", src, err, out)
		}
	})
	if binSkip != "" {
		t.Skip(binSkip)
	}
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

func TestEmbeddedReferenceMatchesShared(t *testing.T) {
	for name, embedded := range map[string][]byte{
		"inpod-rules.v4":  reference.Rules,
		"inpod-routes.sh": reference.Routes,
	} {
		shared, err := os.ReadFile(filepath.Join(sharedReference, name))
		if os.IsNotExist(err) {
			t.Skipf("%s not present: nothing to compare the embedded copy with", sharedReference)
		}
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(shared, embedded) {
			t.Errorf("internal/reference/%s differs from %s/%s: copy it again", name, sharedReference, name)
		}
	}
}

// TestEquivIptables runs every case twice under the reference alone: it must land where
// the case says (the cases are validated against the real ruleset), and the two records
// must be identical (the harness itself is deterministic, so any difference under
// ebpf-redirect is ebpf-redirect's).
func TestEquivIptables(t *testing.T) {
	r := runner(t)
	ref := referenceBackend(t)
	for _, c := range equiv.Cases() {
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
	for _, c := range equiv.Cases() {
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
