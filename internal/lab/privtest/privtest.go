// Package privtest lets the harness's tests skip, with a message naming what is
// missing, on machines where they cannot run: they need CAP_SYS_ADMIN and CAP_NET_ADMIN
// (namespaces, cgroups, mounts, netlink) and a few command-line tools.
package privtest

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

const (
	capNetAdmin = 12
	capSysAdmin = 21
)

// Missing names the first capability or tool the harness lacks, or "" if none.
func Missing(tools ...string) string {
	eff, err := effectiveCaps()
	if err != nil {
		return "capabilities unreadable: " + err.Error()
	}
	for _, c := range []struct {
		bit  uint
		name string
	}{{capSysAdmin, "CAP_SYS_ADMIN"}, {capNetAdmin, "CAP_NET_ADMIN"}} {
		if eff&(1<<c.bit) == 0 {
			return c.name + " (run as root)"
		}
	}
	for _, tool := range append([]string{"ip", "nsenter"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			return "tool " + tool + " not in PATH"
		}
	}
	return ""
}

// TB is the part of testing.TB that Require uses (this package does not import testing,
// so that the CLI can use Missing without linking the test framework).
type TB interface {
	Helper()
	Skip(args ...any)
	Fatal(args ...any)
}

// RequireEnv, set to 1 (CI does), turns the skips of Require into failures: a machine
// meant to run the privileged tests must not pass by skipping them.
const RequireEnv = "EBPF_REDIRECT_REQUIRE_PRIVILEGED"

// Require skips the test if Missing reports anything (fails under RequireEnv=1).
func Require(t TB, tools ...string) {
	t.Helper()
	if m := Missing(tools...); m != "" {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatal("needs " + m + " (and " + RequireEnv + "=1 forbids skipping)")
		}
		t.Skip("needs " + m)
	}
}

func effectiveCaps() (uint64, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, fmt.Errorf("no CapEff in /proc/self/status")
}
