package datapath

import (
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// MinKernel is the oldest kernel the programs load on: bpf_cast_to_kern_ctx
// (6.3) for the tc programs' device namespace; the rest (SO_NETNS_COOKIE,
// sk_storage in sock_addr programs, cgroup getsockopt) is older. tcx needs
// 6.6; below that the legacy tc attachment is used.
var MinKernel = [2]int{6, 3}

// CheckKernel returns a clear error on a kernel older than MinKernel.
func CheckKernel() error {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return err
	}
	return checkRelease(unix.ByteSliceToString(u.Release[:]))
}

func checkRelease(release string) error {
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return fmt.Errorf("kernel release %q: cannot read its version", release)
	}
	major, err1 := strconv.Atoi(parts[0])
	minor, err2 := strconv.Atoi(leadingDigits(parts[1]))
	if err1 != nil || err2 != nil {
		return fmt.Errorf("kernel release %q: cannot read its version", release)
	}
	if major < MinKernel[0] || (major == MinKernel[0] && minor < MinKernel[1]) {
		return fmt.Errorf("kernel %s is too old: ebpf-redirect needs Linux >= %d.%d (>= 6.6 for tcx)", release, MinKernel[0], MinKernel[1])
	}
	return nil
}

func leadingDigits(s string) string {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return s[:i]
}
