//go:build faultinject

package main

// Built only with -tags faultinject (the fault and crash tests build the CLI
// so): EBPF_REDIRECT_FAULT_BEFORE=<step> fails an attach just before that
// step, EBPF_REDIRECT_CRASH_BEFORE=<step> SIGKILLs the process there (no
// deferred clean-up runs, as in a real crash). The product has neither.

import (
	"fmt"
	"os"
	"syscall"

	"github.com/ebpf-redirect/ebpf-redirect/manager"
)

const (
	faultEnv = "EBPF_REDIRECT_FAULT_BEFORE"
	crashEnv = "EBPF_REDIRECT_CRASH_BEFORE"
)

func init() {
	seam = func(o *manager.Options) {
		fault, crash := os.Getenv(faultEnv), os.Getenv(crashEnv)
		o.BeforeStep = func(step string) error {
			if crash == step {
				_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
				select {}
			}
			if fault == step {
				return fmt.Errorf("injected fault before %s (%s)", step, faultEnv)
			}
			return nil
		}
	}
}
